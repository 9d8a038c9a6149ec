//! Entering a named network namespace (`/run/netns/NAME`, as made by `ip netns add`).

use crate::{Error, Result};
use std::path::PathBuf;

/// Moves the calling thread into the network namespace `name`. Call it before any other thread
/// starts: threads spawned afterwards, and every child process, inherit it.
pub fn enter(name: &str) -> Result<()> {
    let odd = name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c.is_control());
    if odd {
        return Err(Error::Invalid(format!(
            "invalid network namespace name {name:?}: give a name shown by `ip netns list` (no '/', no control characters, at most 255 bytes)"
        )));
    }
    let path = PathBuf::from("/run/netns").join(name);
    let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NetnsNotFound {
            name: name.to_string(),
            path: path.clone(),
        },
        _ => Error::NetnsEnter {
            name: name.to_string(),
            source: e,
        },
    })?;
    // Only this thread's network namespace changes.
    use std::os::fd::AsFd;
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| Error::NetnsEnter {
        name: name.to_string(),
        source: e.into(),
    })
}
