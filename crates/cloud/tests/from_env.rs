//! The standard SDK variables: `Ec2::from_env` honours AWS_ENDPOINT_URL_EC2 / AWS_REGION /
//! credentials, and `ImdsMetadata::from_env` honours AWS_EC2_METADATA_SERVICE_ENDPOINT.
//! One test in its own binary, because it sets process environment variables.

mod common;

use cloud::{Ec2, ImdsMetadata, Metadata};
use testkit::moto::Moto;

#[test]
fn from_env_uses_the_standard_variables() {
    let moto = Moto::for_test();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (imds_addr, imds_task) =
        rt.block_on(common::fake_imds::serve(common::fake_imds::two_enis()));

    // SAFETY: set before any other thread of this test reads the environment; this binary has
    // only this test, and the runtime's workers do not touch these variables.
    unsafe {
        std::env::set_var(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://{imds_addr}"),
        );
        std::env::set_var("AWS_REGION", "us-west-2");
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::remove_var("AWS_PROFILE");
        std::env::remove_var("AWS_ENDPOINT_URL");
        std::env::set_var("AWS_ENDPOINT_URL_EC2", moto.endpoint());
    }

    let md = ImdsMetadata::from_env().unwrap();
    let got = rt.block_on(md.instance()).unwrap();
    assert_eq!(got.instance_id, "i-0abc");

    let ec2 = rt.block_on(Ec2::from_env()).unwrap();
    assert_eq!(ec2.region(), "us-west-2");
    // moto pre-creates a default VPC: reaching it proves the endpoint override works.
    let vpcs = rt.block_on(ec2.describe_vpcs(&[], &[])).unwrap();
    assert!(vpcs.iter().any(|v| v.is_default), "{vpcs:?}");

    unsafe { std::env::set_var("AWS_EC2_METADATA_SERVICE_ENDPOINT", "::not a uri::") };
    let err = ImdsMetadata::from_env().unwrap_err();
    assert!(err.to_string().contains("::not a uri::"), "{err}");

    imds_task.abort();
}
