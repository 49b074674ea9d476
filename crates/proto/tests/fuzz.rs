//! Property ("fuzz") tests of the plugin ↔ agent framing: whatever bytes arrive, reading a
//! frame and decoding it return an error instead of panicking or allocating past
//! [`MAX_FRAME`], and every message survives a trip through a frame unchanged.
//!
//! Each property runs 256 cases in `cargo test`; `PROPTEST_CASES=<n> cargo test -p proto fuzz_`
//! runs `n` (docs/testing.md).

use std::io::ErrorKind;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use proptest::prelude::*;
use proto::{
    Allocation, AttachmentKey, MAX_FRAME, PROTOCOL_VERSION, PodRef, ProtoError, Request, Response,
    StatusReply, decode, encode, read_frame,
};
use testkit::fuzz::{config, mutate, mutations};

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn net() -> impl Strategy<Value = Ipv4Net> {
    (ipv4(), 0u8..=32).prop_map(|(a, p)| Ipv4Net::new(a, p).unwrap())
}

fn key() -> impl Strategy<Value = AttachmentKey> {
    (".{0,16}", ".{0,64}", ".{0,16}").prop_map(|(network, container_id, ifname)| AttachmentKey {
        network,
        container_id,
        ifname,
    })
}

fn allocation() -> impl Strategy<Value = Allocation> {
    (
        ipv4(),
        ".{0,21}",
        any::<u32>(),
        any::<u32>(),
        net(),
        prop::collection::vec(net(), 0..4),
    )
        .prop_map(
            |(ip, eni_id, device_number, route_table, subnet, vpc_cidrs)| Allocation {
                ip,
                eni_id,
                device_number,
                route_table,
                subnet,
                vpc_cidrs,
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            key(),
            ".{0,16}",
            ".{0,16}",
            prop::option::of(".{0,64}"),
            ".{0,40}"
        )
            .prop_map(|(key, namespace, name, infra_container_id, netns)| {
                Request::Add {
                    key,
                    pod: PodRef {
                        namespace,
                        name,
                        infra_container_id,
                    },
                    netns,
                }
            }),
        key().prop_map(|key| Request::Del { key }),
        key().prop_map(|key| Request::Check { key }),
        Just(Request::Status),
        (".{0,16}", prop::collection::vec(key(), 0..6))
            .prop_map(|(network, valid)| Request::Gc { network, valid }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (allocation(), any::<bool>()).prop_map(|(allocation, existing)| Response::Added {
            allocation,
            existing
        }),
        prop::option::of(allocation()).prop_map(|released| Response::Deleted { released }),
        allocation().prop_map(|allocation| Response::Checked { allocation }),
        (any::<bool>(), ".{0,40}", any::<u32>(), any::<u32>()).prop_map(
            |(ready, message, free_ips, assigned_ips)| Response::Status(StatusReply {
                ready,
                message,
                free_ips,
                assigned_ips,
            })
        ),
        prop::collection::vec((key(), ipv4()), 0..6)
            .prop_map(|released| Response::Collected { released }),
        (any::<u32>(), ".{0,40}").prop_map(|(code, message)| Response::Error { code, message }),
    ]
}

/// A length prefix: small, around [`MAX_FRAME`], or any.
fn length() -> impl Strategy<Value = u32> {
    let max = MAX_FRAME as u32;
    prop_oneof![
        0u32..64,
        (max - 2)..=(max + 2),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

/// Payloads: arbitrary bytes, a real message with a few bytes changed, JSON of another
/// shape, or nesting deeper than serde_json's recursion limit.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (request(), mutations()).prop_map(|(r, m)| mutate(encode(&r).unwrap()[4..].to_vec(), &m)),
        (response(), mutations()).prop_map(|(r, m)| mutate(encode(&r).unwrap()[4..].to_vec(), &m)),
        prop::sample::select(
            &[
                "{}",
                "null",
                "[]",
                r#"{"version":1}"#,
                r#"{"version":1,"op":"nope"}"#,
                r#"{"version":1,"result":"error"}"#,
                r#"{"version":"1","op":"status"}"#,
                r#"{"version":-1,"op":"status"}"#,
                r#"{"version":4294967296,"op":"status"}"#,
                r#"{"version":1,"op":"status","op":"del"}"#,
                r#"{"version":1,"version":2,"op":"status"}"#,
            ][..]
        )
        .prop_map(|s| s.as_bytes().to_vec()),
        (1usize..100_000, any::<bool>()).prop_map(|(depth, arrays)| {
            let open = if arrays { "[" } else { "{\"a\":" };
            format!(
                r#"{{"version":1,"op":"gc","network":"n","valid":{}"#,
                open.repeat(depth)
            )
            .into_bytes()
        }),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// Any bytes on the wire: a frame is the payload its prefix announces when that many
    /// bytes follow; a prefix over MAX_FRAME is refused before anything more is read (or
    /// allocated); fewer bytes than announced is an early end.
    #[test]
    fn fuzz_read_frame_any_bytes(
        len in length(),
        body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut wire = len.to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        let mut r = &wire[..];
        match read_frame(&mut r) {
            Ok(payload) => {
                prop_assert_eq!(payload.len(), len as usize);
                prop_assert_eq!(&payload[..], &body[..len as usize]);
            }
            Err(ProtoError::TooLarge(n)) => {
                prop_assert_eq!(n, len as usize);
                prop_assert!(n > MAX_FRAME);
                prop_assert_eq!(r.len(), body.len(), "nothing read past the prefix");
            }
            Err(ProtoError::Io(e)) => {
                prop_assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
                prop_assert!(len as usize <= MAX_FRAME && body.len() < len as usize);
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
        // and fewer than four bytes is an early end too
        let short = &wire[..body.len().min(3)];
        prop_assert!(matches!(read_frame(&mut &short[..]), Err(ProtoError::Io(_))));
    }

    /// Any payload decodes to a message or to a protocol violation (never a panic, never a
    /// stack overflow); another version is refused naming it.
    #[test]
    fn fuzz_decode_any_payload(payload in payload()) {
        let errors = [decode::<Request>(&payload).err(), decode::<Response>(&payload).err()];
        for e in errors.into_iter().flatten() {
            prop_assert!(e.is_protocol_violation(), "{e}");
            if let ProtoError::Version { peer } = e {
                prop_assert!(peer != PROTOCOL_VERSION);
                prop_assert!(e.to_string().contains(&peer.to_string()));
            }
        }
    }

    /// Every request survives encode → read_frame → decode unchanged.
    #[test]
    fn fuzz_request_round_trips(req in request()) {
        let frame = encode(&req).unwrap();
        let announced = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        prop_assert_eq!(announced, frame.len() - 4);
        let payload = read_frame(&mut &frame[..]).unwrap();
        prop_assert_eq!(decode::<Request>(&payload).unwrap(), req);
    }

    /// Every response survives encode → read_frame → decode unchanged.
    #[test]
    fn fuzz_response_round_trips(resp in response()) {
        let frame = encode(&resp).unwrap();
        let payload = read_frame(&mut &frame[..]).unwrap();
        prop_assert_eq!(decode::<Response>(&payload).unwrap(), resp);
    }

    /// A message of any other protocol version is refused, and the error names the version.
    #[test]
    fn fuzz_other_versions_are_named(req in request(), version in any::<u32>()) {
        prop_assume!(version != PROTOCOL_VERSION);
        let mut v: serde_json::Value = serde_json::from_slice(&encode(&req).unwrap()[4..]).unwrap();
        v["version"] = version.into();
        let e = decode::<Request>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        prop_assert!(matches!(e, ProtoError::Version { peer } if peer == version), "{e}");
        prop_assert!(e.to_string().contains(&version.to_string()), "{e}");
    }
}
