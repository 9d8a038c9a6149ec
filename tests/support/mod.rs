//! Shared support for the integration tests.

pub mod cluster;
pub mod dashboard;
pub mod deploy;
pub mod netns;
pub mod prometheus;
pub mod sim;
pub mod watch;

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `command` to its end, feeding it `stdin` (else no stdin), and returns what it printed.
pub fn output(mut command: Command, stdin: Option<&str>) -> Output {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    // Written from a thread of its own: a command that prints as it reads would otherwise fill its
    // stdout pipe while we are still writing, and both would wait forever.
    let writer = stdin.map(|input| {
        let mut pipe = child.stdin.take().expect("stdin");
        let input = input.to_owned();
        std::thread::spawn(move || pipe.write_all(input.as_bytes()))
    });
    let out = child.wait_with_output().expect("wait");
    if let Some(writer) = writer {
        writer.join().expect("stdin writer").expect("write stdin");
    }
    out
}

/// Runs `command` and returns its stdout; panics with its output when it fails.
pub fn run(command: Command, stdin: Option<&str>) -> String {
    let shown = format!("{command:?}");
    let out = output(command, stdin);
    assert!(
        out.status.success(),
        "{shown} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}
