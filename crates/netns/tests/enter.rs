//! Entering namespaces for real (root: `setns` needs CAP_SYS_ADMIN, even into one's own
//! namespace). Every namespace is a `testkit::TestNs`, deleted on drop.

use std::path::Path;
use std::process::Command;

use netns::{NetNs, NetnsError};
use testkit::{TestNs, require_root};

#[test]
#[ignore = "root: setns into the test's own namespace"]
fn run_in_current_ns_returns_value_and_borrows() {
    require_root();
    let cur = NetNs::current().unwrap();
    let data = [1, 2, 3];
    let sum: i32 = cur.run(|| data.iter().sum()).unwrap();
    assert_eq!(sum, 6);
}

#[test]
#[ignore = "root: setns (refused for a file that is not a namespace)"]
fn run_on_non_namespace_file_fails_naming_it() {
    require_root();
    let ns = NetNs::open(Path::new("/proc/self/status")).unwrap();
    let err = ns.run(|| ()).unwrap_err();
    assert!(matches!(err, NetnsError::Setns { .. }), "{err:?}");
    assert!(err.to_string().contains("/proc/self/status"));
}

#[test]
#[ignore = "root: setns into the test's own namespace"]
fn run_propagates_panic() {
    require_root();
    let cur = NetNs::current().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cur.run(|| -> () { panic!("boom inside") })
    }));
    let payload = r.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom inside"));
}

#[test]
#[ignore = "root: creates a network namespace"]
fn run_enters_namespace_and_leaves_caller_alone() {
    require_root();
    let t = TestNs::new("run");
    let ns = t.open();
    let before = NetNs::current().unwrap().id().unwrap();
    let target = ns.id().unwrap();
    assert_ne!(before, target);

    let inside = ns.run(|| NetNs::current().unwrap().id().unwrap()).unwrap();
    assert_eq!(inside, target, "closure did not run inside the namespace");
    // the caller's thread did not move
    assert_eq!(NetNs::current().unwrap().id().unwrap(), before);
    assert!(!ns.is_current().unwrap());
    assert!(ns.run(|| ns.is_current().unwrap()).unwrap());
}

#[test]
#[ignore = "root: creates a network namespace and a veth in it"]
fn child_process_spawned_inside_sees_namespace() {
    require_root();
    let t = TestNs::new("child");
    // a link only this namespace has
    t.ip("link add vtst0 type veth peer name vtst1");
    let ns = t.open();
    let inside = ns
        .run(|| {
            Command::new("ip")
                .args(["-o", "link", "show", "vtst0"])
                .output()
                .unwrap()
        })
        .unwrap();
    assert!(
        inside.status.success(),
        "vtst0 not visible inside: {inside:?}"
    );
    // not visible from the caller's namespace
    let outside = Command::new("ip")
        .args(["-o", "link", "show", "vtst0"])
        .output()
        .unwrap();
    assert!(!outside.status.success(), "vtst0 leaked into caller ns");
}
