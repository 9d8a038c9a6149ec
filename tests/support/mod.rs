//! Shared support for the integration tests.

pub mod cluster;
pub mod deploy;
pub mod netns;
