//! Command-line values that more than one command reads (`loopguard node ...` and
//! `loopguard agent`): parsed once, with the same words when they are wrong.

use std::time::Duration;

/// Parses `--resync`: seconds (fractions allowed) between 0.1 and one day. Shorter would make
/// the re-check a busy loop, longer is no re-check at all.
pub fn seconds(text: &str) -> std::result::Result<Duration, String> {
    const MIN: f64 = 0.1;
    const MAX: f64 = 86_400.0;
    match text.trim().parse::<f64>() {
        Ok(s) if (MIN..=MAX).contains(&s) => Ok(Duration::from_secs_f64(s)),
        Ok(_) => Err(format!(
            "must be between {MIN} and {MAX} seconds (10 is the default)"
        )),
        Err(_) => Err("must be a number of seconds, for example 10 or 0.5".into()),
    }
}

/// Parses `--wait`: whole seconds, at most an hour.
pub fn wait_seconds(text: &str) -> std::result::Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(s) if s <= 3600 => Ok(s),
        _ => Err("must be a whole number of seconds between 0 and 3600".into()),
    }
}
