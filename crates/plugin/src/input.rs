//! Reading the network configuration from stdin: until EOF, by the call's deadline, at most
//! [`MAX_STDIN`] bytes. A runtime that never closes stdin, or feeds it forever, gets an error
//! in time instead of a plugin that waits with it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};

use crate::deadline::Deadline;

/// The largest network configuration accepted (a real one is a few KiB, a chained
/// prevResult or a GC attachment list of thousands of pods some hundred KiB).
pub const MAX_STDIN: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StdinError {
    #[error("the network configuration on stdin is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error(
        "stdin was not closed within {waited:.1?} ({got} bytes read): the runtime must write the network configuration and close stdin"
    )]
    NotClosed { waited: Duration, got: usize },
    #[error("cannot read the network configuration from stdin: {0}")]
    Io(#[source] io::Error),
}

/// Reads the process's stdin (see [`read_until_eof`]).
pub fn read_stdin(deadline: &Deadline) -> Result<Vec<u8>, StdinError> {
    read_until_eof(io::stdin().as_fd(), deadline, MAX_STDIN)
}

/// Reads `fd` to EOF. Each read waits (poll(2)) for at most the time left before
/// `deadline`; more than `limit` bytes is an error (the rest is not read).
pub fn read_until_eof(
    fd: BorrowedFd<'_>,
    deadline: &Deadline,
    limit: usize,
) -> Result<Vec<u8>, StdinError> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let timeout = proto::poll_timeout(deadline.remaining());
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => {
                return Err(StdinError::NotClosed {
                    waited: deadline.elapsed_at(Instant::now()),
                    got: buf.len(),
                });
            }
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(StdinError::Io(e.into())),
        }
        if fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLNVAL))
        {
            return Err(StdinError::Io(Errno::EBADF.into()));
        }
        // readable, at EOF, or in error: read(2) does not block and says which
        let want = chunk.len().min(limit + 1 - buf.len());
        match nix::unistd::read(fd, &mut chunk[..want]) {
            Ok(0) => return Ok(buf),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > limit {
                    return Err(StdinError::TooLarge { limit });
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err(StdinError::Io(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn within(ms: u64) -> Deadline {
        // the exit margin is taken off the budget: add it back
        Deadline::new(
            Instant::now(),
            Duration::from_millis(ms) + crate::deadline::EXIT_MARGIN,
        )
    }

    #[test]
    fn reads_to_eof() {
        let (mut w, r) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            w.write_all(b"{\"cniVersion\":").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            w.write_all(b"\"1.0.0\"}").unwrap();
        });
        let got = read_until_eof(r.as_fd(), &within(5000), MAX_STDIN).unwrap();
        assert_eq!(got, b"{\"cniVersion\":\"1.0.0\"}");
        t.join().unwrap();
    }

    #[test]
    fn a_stdin_never_closed_ends_at_the_deadline() {
        let (mut w, r) = UnixStream::pair().unwrap();
        w.write_all(b"{\"cniVersion\":").unwrap();
        let t = Instant::now();
        let e = read_until_eof(r.as_fd(), &within(200), MAX_STDIN).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(matches!(e, StdinError::NotClosed { got: 14, .. }), "{e:?}");
        assert!(e.to_string().contains("not closed"), "{e}");
        drop(w);
    }

    #[test]
    fn the_cap_is_enforced_exactly() {
        for (len, ok) in [(1000, true), (1024, true), (1025, false), (5000, false)] {
            let (mut w, r) = UnixStream::pair().unwrap();
            let t = std::thread::spawn(move || {
                // the reader stops at the cap: the rest may not be taken
                let _ = w.write_all(&vec![b' '; len]);
            });
            let got = read_until_eof(r.as_fd(), &within(5000), 1024);
            drop(r);
            t.join().unwrap();
            match got {
                Ok(b) => assert!(ok && b.len() == len, "{len}"),
                Err(StdinError::TooLarge { limit: 1024 }) => assert!(!ok, "{len}"),
                Err(e) => panic!("{len}: {e}"),
            }
        }
    }

    #[test]
    fn an_endless_stdin_is_capped() {
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let e = read_until_eof(zero.as_fd(), &within(5000), MAX_STDIN).unwrap_err();
        assert!(matches!(e, StdinError::TooLarge { .. }), "{e:?}");
    }

    #[test]
    fn an_empty_stdin_is_empty() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(
            read_until_eof(null.as_fd(), &within(5000), MAX_STDIN)
                .unwrap()
                .is_empty()
        );
    }
}
