//! Test helpers of the cloud tests: a table-driven IMDSv2 fake. (moto comes from
//! `testkit::moto`, shared with the lab.)
#![allow(dead_code)]

pub mod fake_imds;
