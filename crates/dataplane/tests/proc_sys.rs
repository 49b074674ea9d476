//! `set_proc_sys`: sysctls go under the root the agent was given (a host mount of
//! `/proc/sys/net` in an unprivileged container), and a read-only one says what to do. Its own
//! test binary: the root is set once per process.

use dataplane::NetOps;
use dataplane::netlink::{Netlink, set_proc_sys};

#[test]
fn sysctls_are_written_under_the_given_root() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("net/ipv4/ip_forward");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "0").unwrap();
    assert!(set_proc_sys(root.path()));
    assert!(!set_proc_sys(root.path()), "set once per process");
    // Opening a route socket needs no privilege; nothing is sent.
    let mut n = Netlink::new().expect("a netlink socket");
    n.write_sysctl("net/ipv4/ip_forward", "1").unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "1");
    let e = n
        .write_sysctl("net/ipv4/conf/nope0/rp_filter", "2")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            &root
                .path()
                .join("net/ipv4/conf/nope0/rp_filter")
                .display()
                .to_string()
        ),
        "{e}"
    );
}
