//! The RPC runtime over real Unix sockets: call shapes, many streams, bad input,
//! cancellation, flow control, dying peers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use prost::Message;
use proto::frame::{self, Kind};
use proto::gen::wrenn::wire::v1::{Hello, HelloAck};
use proto::rpc::{CallOpts, Client, Credential, ServerConfig};
use proto::Code;

use crate::support::*;

fn opts(end: bool) -> CallOpts {
    CallOpts {
        timeout: Some(Duration::from_secs(30)),
        end_stream: end,
    }
}

#[test]
fn unary_round_trip_and_errors() {
    let srv = TestServer::start();
    let c = srv.client();
    let b = Blob {
        data: b"hello".to_vec(),
        n: 7,
        size: 0,
    };
    let r: Blob = c.unary(UNARY, &b, Some(Duration::from_secs(5))).unwrap();
    assert_eq!(r, b);
    let e = c.unary::<_, Blob>(FAIL, &b, None).unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (Code::NotFound, "nothing here")
    );
    assert_eq!(
        code_of(c.unary::<_, Blob>("test.T/Nope", &b, None)),
        Code::Unimplemented
    );
    // A malformed request message is the caller's error, and the connection survives it.
    let garbage = Blob {
        data: vec![],
        n: 0,
        size: 0,
    };
    let mut s = c.call(UNARY, &garbage, opts(true)).unwrap();
    assert!(s.recv::<Blob>().unwrap().is_some());
    let r: Blob = c.unary(UNARY, &b, None).unwrap();
    assert_eq!(r.n, 7);
}

#[test]
fn server_streaming_in_order() {
    let srv = TestServer::start();
    let c = srv.client();
    let mut s = c
        .call(
            COUNT,
            &Blob {
                data: vec![],
                n: 500,
                size: 10_000,
            },
            opts(true),
        )
        .unwrap();
    for i in 0..500u64 {
        let m: Blob = s.recv().unwrap().expect("message");
        assert_eq!(m.n, i);
        assert_eq!(m.data.len(), 10_000);
        assert!(m.data.iter().all(|b| *b == (i % 251) as u8));
    }
    assert!(s.recv::<Blob>().unwrap().is_none());
}

#[test]
fn client_streaming_and_bidi() {
    let srv = TestServer::start();
    let c = srv.client();
    let mut s = c.call(SUM, &Blob::default(), opts(false)).unwrap();
    // The first message is the request itself (empty data), then 300 more.
    for i in 0..300usize {
        s.send(&Blob {
            data: vec![1; i * 100],
            n: 0,
            size: 0,
        })
        .unwrap();
    }
    s.close_send().unwrap();
    let r: Blob = s.recv().unwrap().unwrap();
    assert_eq!(r.n, 300);
    assert_eq!(r.size, (0..300u64).map(|i| i * 100).sum::<u64>());
    assert!(s.recv::<Blob>().unwrap().is_none());

    let mut s = c.call(BIDI, &Blob::default(), opts(false)).unwrap();
    for i in 0..200u64 {
        s.send(&Blob {
            data: vec![3; 64],
            n: i,
            size: 0,
        })
        .unwrap();
        let back: Blob = s.recv().unwrap().unwrap();
        assert_eq!(back.n, i);
    }
    s.close_send().unwrap();
    assert!(s.recv::<Blob>().unwrap().is_none());
}

#[test]
fn hundreds_of_interleaved_streams() {
    let srv = TestServer::start();
    let c = srv.client();
    // 120 server streams open at once on one connection (limit 128), read round-robin.
    let mut streams: Vec<_> = (0..120)
        .map(|_| {
            c.call(
                COUNT,
                &Blob {
                    data: vec![],
                    n: 40,
                    size: 3000,
                },
                opts(true),
            )
            .unwrap()
        })
        .collect();
    let mut got = vec![0u64; streams.len()];
    for round in 0..41 {
        for (i, s) in streams.iter_mut().enumerate() {
            match s.recv::<Blob>().unwrap() {
                Some(m) => {
                    assert_eq!(m.n, got[i]);
                    got[i] += 1;
                }
                None => assert_eq!(round, 40),
            }
        }
    }
    assert!(got.iter().all(|g| *g == 40));
    // And from many threads at once on the same connection.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let b = Blob {
                        data: vec![t as u8; (i * 37) as usize],
                        n: i,
                        size: t,
                    };
                    let r: Blob = c.unary(UNARY, &b, Some(Duration::from_secs(30))).unwrap();
                    assert_eq!(r, b);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn too_many_streams_is_refused_per_stream() {
    let mut cfg = ServerConfig::new("test");
    cfg.max_streams = 4;
    let srv = TestServer::start_with(cfg, None);
    let c = srv.client();
    let held: Vec<_> = (0..4)
        .map(|_| c.call(HANG, &Blob::default(), opts(true)).unwrap())
        .collect();
    let mut fifth = c.call(HANG, &Blob::default(), opts(true)).unwrap();
    assert_eq!(
        fifth.recv::<Blob>().unwrap_err().code,
        Code::ResourceExhausted
    );
    drop(held);
    // Cancelling freed the streams: new calls go through again.
    wait_until(|| srv.stats.cancelled.load(Ordering::SeqCst) == 4);
    let r: Blob = c
        .unary(
            UNARY,
            &Blob {
                n: 1,
                ..Blob::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(r.n, 1);
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "condition not reached in 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn cancellation_reaches_the_handler_and_frees_streams() {
    let srv = TestServer::start();
    let c = srv.client();
    for round in 1..=3 {
        let calls: Vec<_> = (0..100)
            .map(|_| c.call(HANG, &Blob::default(), opts(true)).unwrap())
            .collect();
        wait_until(|| srv.stats.hang_started.load(Ordering::SeqCst) == round * 100);
        for s in calls {
            s.cancel();
        }
        wait_until(|| srv.stats.cancelled.load(Ordering::SeqCst) == round * 100);
    }
    // 300 streams were opened in total on this connection (limit 128 at once): all freed.
    let r: Blob = c
        .unary(
            UNARY,
            &Blob {
                n: 9,
                ..Blob::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(r.n, 9);
}

#[test]
fn deadlines_fail_both_sides() {
    let srv = TestServer::start();
    let c = srv.client();
    let t0 = Instant::now();
    let mut s = c
        .call(
            HANG,
            &Blob::default(),
            CallOpts {
                timeout: Some(Duration::from_millis(300)),
                end_stream: true,
            },
        )
        .unwrap();
    assert_eq!(s.recv::<Blob>().unwrap_err().code, Code::DeadlineExceeded);
    assert!(t0.elapsed() < Duration::from_secs(5));
    wait_until(|| srv.stats.cancelled.load(Ordering::SeqCst) == 1);
}

#[test]
fn credential_is_checked() {
    let srv = TestServer::start_with(ServerConfig::new("test"), Some("sesame".into()));
    let e = Client::connect_unix(&srv.path, Credential::access_token("wrong")).unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated);
    let c = Client::connect_unix(&srv.path, Credential::access_token("sesame")).unwrap();
    let r: Blob = c
        .unary(
            UNARY,
            &Blob {
                n: 2,
                ..Blob::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(r.n, 2);
    assert_eq!(c.server_info().server, "test");
}

#[test]
fn credential_revocation_closes_connections() {
    let srv = TestServer::start();
    let c = srv.client();
    let _: Blob = c.unary(UNARY, &Blob::default(), None).unwrap();
    srv.handle.close_connections(|_| true);
    wait_until(|| c.is_closed() || c.unary::<_, Blob>(UNARY, &Blob::default(), None).is_err());
}

/// A raw connection that has said hello, for sending hand-made frames.
fn raw_hello(path: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Hello {
        version: proto::PROTOCOL_VERSION,
        ..Hello::default()
    };
    let mut out = Vec::new();
    frame::put_frame(&mut out, 0, Kind::Hello, 0, &hello.encode_to_vec());
    s.write_all(&out).unwrap();
    let f = read_frame(&mut s).expect("hello ack");
    assert_eq!(f.1, Kind::HelloAck);
    HelloAck::decode(&f.3[..]).unwrap();
    s
}

/// Reads one frame: (stream, kind, flags, body); None at EOF.
fn read_frame(s: &mut UnixStream) -> Option<(u32, Kind, u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let len = u32::from_be_bytes(len) as usize;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).ok()?;
    let stream = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    Some((
        stream,
        Kind::from_u8(rest[4]).unwrap(),
        rest[5],
        rest[6..].to_vec(),
    ))
}

/// Reads frames until a connection ERROR and EOF; returns the error's code.
fn expect_conn_error(s: &mut UnixStream) -> Code {
    expect_conn_error_msg(s).0
}

/// Reads frames until a connection ERROR and EOF; returns the error's code and message.
fn expect_conn_error_msg(s: &mut UnixStream) -> (Code, String) {
    let mut err = None;
    while let Some((stream, kind, _, body)) = read_frame(s) {
        if kind == Kind::Error && stream == 0 {
            let (code, msg) = frame::parse_error(&body).unwrap();
            err = Some((code, msg.to_owned()));
        }
    }
    err.expect("a connection error before EOF")
}

/// Sends `hello` on a new connection and returns the connection error it gets.
fn hello_refused(path: &std::path::Path, hello: &Hello) -> (Code, String) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    frame::put_frame(&mut out, 0, Kind::Hello, 0, &hello.encode_to_vec());
    s.write_all(&out).unwrap();
    expect_conn_error_msg(&mut s)
}

/// Issue 12 item 14: a HELLO announcing limits below PROTOCOL.md §6's minimums is refused
/// with `invalid_argument` naming the field (it used to be accepted, then every call failed
/// naming the wrong limit or hung).
#[test]
fn hello_limits_below_minimums_are_refused_naming_the_field() {
    let srv = TestServer::start();
    let base = Hello {
        version: proto::PROTOCOL_VERSION,
        ..Hello::default()
    };
    let cases = [
        (
            Hello {
                frame_len_max: 100,
                ..base.clone()
            },
            "frame_len_max",
        ),
        (
            Hello {
                frame_len_max: 32 << 20,
                ..base.clone()
            },
            "frame_len_max",
        ),
        (
            Hello {
                stream_window: 1,
                ..base.clone()
            },
            "stream_window",
        ),
        (
            Hello {
                conn_window: 1,
                ..base.clone()
            },
            "conn_window",
        ),
        // 4/3 of a 48 KiB frame is 64 KiB: one byte less is refused.
        (
            Hello {
                frame_len_max: 48 * 1024,
                stream_window: 64 * 1024 - 1,
                ..base.clone()
            },
            "stream_window",
        ),
    ];
    for (hello, field) in cases {
        let (code, msg) = hello_refused(&srv.path, &hello);
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains(field), "{field}: {msg}");
    }
    // At the minimums exactly, calls work.
    let cfg = proto::rpc::ClientConfig {
        frame_len_max: proto::limits::FRAME_LEN_MAX_FLOOR,
        stream_window: proto::limits::window_min(proto::limits::FRAME_LEN_MAX_FLOOR),
        conn_window: proto::limits::window_min(proto::limits::FRAME_LEN_MAX_FLOOR),
        ..Default::default()
    };
    let sock = UnixStream::connect(&srv.path).unwrap();
    let c = Client::from_stream(sock.into(), Credential::none(), &cfg).unwrap();
    let mut s = c
        .call(
            COUNT,
            &Blob {
                n: 20,
                size: 10_000,
                ..Blob::default()
            },
            opts(true),
        )
        .unwrap();
    let mut got = 0;
    while let Some(b) = s.recv::<Blob>().unwrap() {
        assert_eq!(b.data.len(), 10_000);
        got += 1;
    }
    assert_eq!(got, 20);
    // A client refuses to announce limits below the minimums, and a server to start.
    let sock = UnixStream::connect(&srv.path).unwrap();
    let bad = proto::rpc::ClientConfig {
        stream_window: 1000,
        ..Default::default()
    };
    let e = Client::from_stream(sock.into(), Credential::none(), &bad).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    assert!(e.message.contains("stream_window"), "{e}");
    let mut cfg = ServerConfig::new("bad");
    cfg.conn_window = 1000;
    let svc = std::sync::Arc::new(TestService {
        stats: Default::default(),
        secret: None,
    });
    assert!(proto::rpc::Server::new(cfg, svc).is_err());
}

/// Issue 12 item 14: protocol faults by a client are its error (`invalid_argument`), not the
/// server's (`internal`).
#[test]
fn client_protocol_faults_are_invalid_argument() {
    let srv = TestServer::start();
    let req = Blob::default().encode_to_vec();
    // A reused stream id.
    let mut s = raw_hello(&srv.path);
    let mut out = Vec::new();
    frame::put_request(&mut out, 3, frame::FLAG_END_STREAM, UNARY, 0, &req);
    s.write_all(&out).unwrap();
    assert_eq!(read_frame(&mut s).unwrap().0, 3);
    s.write_all(&out).unwrap();
    let (code, msg) = expect_conn_error_msg(&mut s);
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("reused"), "{msg}");
    // END on a stream never opened.
    let mut s = raw_hello(&srv.path);
    out.clear();
    frame::put_frame(&mut out, 9, Kind::End, 0, &[]);
    s.write_all(&out).unwrap();
    assert_eq!(expect_conn_error(&mut s), Code::InvalidArgument);
    // A WINDOW increment that overflows the connection window.
    let mut s = raw_hello(&srv.path);
    out.clear();
    for _ in 0..3 {
        frame::put_window(&mut out, 0, u32::MAX);
    }
    s.write_all(&out).unwrap();
    let (code, msg) = expect_conn_error_msg(&mut s);
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    // DATA after the client's END_STREAM.
    let mut s = raw_hello(&srv.path);
    out.clear();
    frame::put_request(&mut out, 1, frame::FLAG_END_STREAM, HANG, 0, &req);
    frame::put_frame(&mut out, 1, Kind::Data, 0, b"");
    s.write_all(&out).unwrap();
    assert_eq!(expect_conn_error(&mut s), Code::InvalidArgument);
}

/// Issue 12 item 14: shutdown is graceful (PROTOCOL.md §5): GOAWAY to every connection, no
/// new connections, calls already open finish, then the loop returns.
#[test]
fn shutdown_sends_goaway_and_lets_open_calls_finish() {
    let srv = TestServer::start();
    let c = srv.client();
    let path = srv.path.clone();
    let mut raw = raw_hello(&path);
    let mut pre = UnixStream::connect(&path).unwrap();
    pre.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let slow = std::thread::spawn(move || {
        c.unary::<_, Blob>(
            SLOW,
            &Blob {
                n: 600,
                ..Blob::default()
            },
            None,
        )
    });
    std::thread::sleep(Duration::from_millis(150));
    let t0 = Instant::now();
    let stopper = std::thread::spawn(move || srv.stop());
    // The idle raw connection gets GOAWAY and is closed.
    let (stream, kind, _, body) = read_frame(&mut raw).expect("GOAWAY");
    assert_eq!((stream, kind), (0, Kind::GoAway));
    let (_, code, _) = frame::parse_goaway(&body);
    assert_eq!(code, Code::Unavailable);
    assert!(read_frame(&mut raw).is_none());
    // A connection still before its hello is closed with `unavailable`.
    assert_eq!(expect_conn_error(&mut pre), Code::Unavailable);
    // New connections are refused.
    std::thread::sleep(Duration::from_millis(50));
    assert!(Client::connect_unix(&path, Credential::none()).is_err());
    // The open call finished normally, and then the server stopped.
    let r = slow
        .join()
        .unwrap()
        .expect("the open call finishes during the drain");
    assert_eq!(r.n, 600);
    stopper.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// The drain is bounded: a call that does not finish is cut at `drain_timeout`.
#[test]
fn shutdown_drain_is_bounded() {
    let mut cfg = ServerConfig::new("test");
    cfg.drain_timeout = Duration::from_millis(300);
    let srv = TestServer::start_with(cfg, None);
    let c = srv.client();
    let mut s = c.call(HANG, &Blob::default(), opts(true)).unwrap();
    wait_until(|| srv.stats.hang_started.load(Ordering::SeqCst) == 1);
    let t0 = Instant::now();
    srv.stop();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(s.recv::<Blob>().unwrap_err().code, Code::Unavailable);
}

#[test]
fn garbage_and_truncated_input() {
    let srv = TestServer::start();
    // Garbage instead of a hello.
    let mut s = UnixStream::connect(&srv.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[0, 0, 0, 9, 0xde, 0xad, 0xbe, 0xef, 0xff, 0, 1, 2, 3])
        .unwrap();
    let _ = expect_conn_error(&mut s);
    // Garbage after the hello.
    let mut s = raw_hello(&srv.path);
    s.write_all(&[0, 0, 0, 8, 0, 0, 0, 1, Kind::Window as u8, 0, 1, 2])
        .unwrap();
    assert_eq!(expect_conn_error(&mut s), Code::InvalidArgument);
    // A truncated frame followed by a close: the server just drops the connection.
    let mut s = raw_hello(&srv.path);
    s.write_all(&[0, 0, 1, 0, 0, 0]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(read_frame(&mut s).is_none());
    // A frame for a stream never opened.
    let mut s = raw_hello(&srv.path);
    let mut out = Vec::new();
    frame::put_frame(&mut out, 5, Kind::Data, 0, b"x");
    s.write_all(&out).unwrap();
    assert_eq!(expect_conn_error(&mut s), Code::InvalidArgument);
    // The server still serves well-behaved clients.
    let r: Blob = srv
        .client()
        .unary(
            UNARY,
            &Blob {
                n: 3,
                ..Blob::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(r.n, 3);
}

/// Issue 12 item 13: a unary reply is one DATA frame with END_STREAM (PROTOCOL.md §3), from
/// the loop (`Call::reply`) and from a worker (`ServerStream::reply`) alike; the next frame
/// on the connection is the next call's answer, never an END.
#[test]
fn unary_reply_is_one_data_frame_with_end_stream() {
    let srv = TestServer::start();
    let mut s = raw_hello(&srv.path);
    let mut out = Vec::new();
    for (id, method) in [(1, UNARY), (3, WORKER_UNARY), (5, UNARY)] {
        let req = Blob {
            n: id as u64,
            ..Blob::default()
        }
        .encode_to_vec();
        frame::put_request(&mut out, id, frame::FLAG_END_STREAM, method, 0, &req);
        s.write_all(&out).unwrap();
        out.clear();
        let (stream, kind, flags, body) = read_frame(&mut s).unwrap();
        assert_eq!(
            (stream, kind, flags & frame::FLAG_END_STREAM),
            (id, Kind::Data, frame::FLAG_END_STREAM),
            "{method}: the reply must be DATA with END_STREAM"
        );
        assert_eq!(Blob::decode(&body[..]).unwrap().n, id as u64);
    }
}

/// A client accepts both forms of a unary answer: DATA with END_STREAM, and DATA then END.
#[test]
fn client_accepts_both_unary_reply_forms() {
    let srv = TestServer::start();
    let c = srv.client();
    for method in [UNARY, WORKER_UNARY, TWO_FRAME_UNARY] {
        for n in 0..3 {
            let b = Blob {
                n,
                ..Blob::default()
            };
            let r: Blob = c.unary(method, &b, Some(Duration::from_secs(5))).unwrap();
            assert_eq!(r.n, n, "{method}");
        }
    }
}

#[test]
fn unknown_frame_kinds() {
    let srv = TestServer::start();
    let mut s = raw_hello(&srv.path);
    // Ignorable unknown kind: skipped; then a real call works on the same connection.
    let mut out = vec![0, 0, 0, 9, 0, 0, 0, 0, 77, frame::FLAG_IGNORABLE, 1, 2, 3];
    let req = Blob {
        n: 4,
        ..Blob::default()
    }
    .encode_to_vec();
    frame::put_request(&mut out, 1, frame::FLAG_END_STREAM, UNARY, 0, &req);
    s.write_all(&out).unwrap();
    let (stream, kind, flags, body) = read_frame(&mut s).unwrap();
    assert_eq!(
        (stream, kind, flags & frame::FLAG_END_STREAM),
        (1, Kind::Data, frame::FLAG_END_STREAM)
    );
    assert_eq!(Blob::decode(&body[..]).unwrap().n, 4);
    // Unknown kind without the flag: connection error.
    s.write_all(&[0, 0, 0, 6, 0, 0, 0, 0, 77, 0]).unwrap();
    assert_eq!(expect_conn_error(&mut s), Code::InvalidArgument);
}

#[test]
fn oversized_frames_are_refused_without_allocation() {
    let srv = TestServer::start();
    let mut s = raw_hello(&srv.path);
    // Claims 16 MiB, sends 10 bytes: refused from the length alone.
    s.write_all(&[1, 0, 0, 0, 0, 0, 0, 1, Kind::Data as u8, 0])
        .unwrap();
    assert_eq!(expect_conn_error(&mut s), Code::ResourceExhausted);
    // Before the hello the limit is 16 KiB.
    let mut s = UnixStream::connect(&srv.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[0, 1, 0, 0, 0, 0, 0, 0, Kind::Hello as u8, 0])
        .unwrap();
    // One code for "too long", before the hello as after it (issue 12 item 14).
    assert_eq!(expect_conn_error(&mut s), Code::ResourceExhausted);
    // A client refuses to send a message over the server's limit.
    let c = srv.client();
    let big = Blob {
        data: vec![0; 2 << 20],
        ..Blob::default()
    };
    assert_eq!(
        code_of(c.call(UNARY, &big, opts(true))),
        Code::InvalidArgument
    );
}

#[test]
fn flow_control_violation_closes_the_connection() {
    let mut cfg = ServerConfig::new("test");
    cfg.stream_window = 64 * 1024;
    cfg.frame_len_max = 48 * 1024;
    let srv = TestServer::start_with(cfg, None);
    let mut s = raw_hello(&srv.path);
    let mut out = Vec::new();
    frame::put_request(&mut out, 1, 0, HANG, 0, &[]);
    for _ in 0..3 {
        frame::put_frame(&mut out, 1, Kind::Data, 0, &vec![0u8; 40 * 1024]);
    }
    s.write_all(&out).unwrap();
    assert_eq!(expect_conn_error(&mut s), Code::ResourceExhausted);
}

#[test]
fn wrong_version_is_refused() {
    let srv = TestServer::start();
    let mut s = UnixStream::connect(&srv.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Hello {
        version: 99,
        ..Hello::default()
    };
    let mut out = Vec::new();
    frame::put_frame(&mut out, 0, Kind::Hello, 0, &hello.encode_to_vec());
    s.write_all(&out).unwrap();
    assert_eq!(expect_conn_error(&mut s), Code::FailedPrecondition);
}

#[test]
fn dying_server_fails_every_waiting_call() {
    // A fake server that answers the hello, reads requests, then vanishes.
    let dir = TempDir::new("die");
    let path = dir.path.join("s.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _hello = read_frame(&mut s).unwrap();
        let ack = HelloAck {
            version: proto::PROTOCOL_VERSION,
            ..HelloAck::default()
        };
        let mut out = Vec::new();
        frame::put_frame(&mut out, 0, Kind::HelloAck, 0, &ack.encode_to_vec());
        s.write_all(&out).unwrap();
        for _ in 0..10 {
            read_frame(&mut s).unwrap();
        }
        drop(s);
    });
    let c = Client::connect_unix(&path, Credential::none()).unwrap();
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let e = c
                    .unary::<_, Blob>(UNARY, &Blob::default(), None)
                    .unwrap_err();
                (e.code, t0.elapsed())
            })
        })
        .collect();
    fake.join().unwrap();
    for w in waiters {
        let (code, took) = w.join().unwrap();
        assert_eq!(code, Code::Unavailable);
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }
}

#[test]
fn dying_client_cancels_server_handlers() {
    let srv = TestServer::start();
    let c = srv.client();
    let calls: Vec<_> = (0..20)
        .map(|_| c.call(HANG, &Blob::default(), opts(true)).unwrap())
        .collect();
    wait_until(|| srv.stats.hang_started.load(Ordering::SeqCst) == 20);
    // The connection goes away under open calls, as when a client process dies.
    c.close();
    drop(calls);
    drop(c);
    wait_until(|| srv.stats.cancelled.load(Ordering::SeqCst) == 20);
}

#[test]
fn property_random_calls_echo_exactly() {
    let seed = seed("property_random_calls_echo_exactly");
    let mut rng = Rng::new(seed);
    let srv = TestServer::start();
    let c = srv.client();
    for _ in 0..200 {
        match rng.below(3) {
            0 => {
                let len = rng.below(200_000) as usize;
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let b = Blob {
                    data,
                    n: rng.next(),
                    size: 0,
                };
                let r: Blob = c.unary(UNARY, &b, None).unwrap();
                assert_eq!(r, b, "seed {seed}");
            }
            1 => {
                let n = rng.below(50);
                let size = rng.below(100_000);
                let mut s = c
                    .call(
                        COUNT,
                        &Blob {
                            data: vec![],
                            n,
                            size,
                        },
                        opts(true),
                    )
                    .unwrap();
                for i in 0..n {
                    let m: Blob = s.recv().unwrap().unwrap();
                    assert_eq!((m.n, m.data.len() as u64), (i, size), "seed {seed}");
                }
                assert!(s.recv::<Blob>().unwrap().is_none(), "seed {seed}");
            }
            _ => {
                let mut s = c.call(BIDI, &Blob::default(), opts(false)).unwrap();
                let k = rng.below(20);
                for i in 0..k {
                    let len = rng.below(70_000) as usize;
                    let b = Blob {
                        data: vec![i as u8; len],
                        n: i,
                        size: 0,
                    };
                    s.send(&b).unwrap();
                    assert_eq!(s.recv::<Blob>().unwrap().unwrap(), b, "seed {seed}");
                }
                s.close_send().unwrap();
                assert!(s.recv::<Blob>().unwrap().is_none(), "seed {seed}");
            }
        }
    }
}

/// Child-process side of `slow_reader_bounds_writer_rss`: serves the test service on the
/// socket named by `WRENN_RSS_HELPER_SOCK` until its stdin closes.
#[test]
#[ignore = "helper process started by slow_reader_bounds_writer_rss"]
fn rss_helper() {
    let Ok(path) = std::env::var("WRENN_RSS_HELPER_SOCK") else {
        return;
    };
    let svc = std::sync::Arc::new(TestService {
        stats: Default::default(),
        secret: None,
    });
    let mut server = proto::rpc::Server::new(ServerConfig::new("rss"), svc).unwrap();
    server.listen_unix(&path).unwrap();
    let (_h, _j) = server.spawn().unwrap();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn slow_reader_bounds_writer_rss() {
    const MESSAGES: u64 = 16 * 1024;
    const SIZE: u64 = 64 * 1024; // 1 GiB in all
    const BOUND_KIB: u64 = 32 * 1024;
    let dir = TempDir::new("rss");
    let path = dir.path.join("w.sock");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "rpc::rss_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WRENN_RSS_HELPER_SOCK", &path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let c = loop {
        if let Ok(c) = Client::connect_unix(&path, Credential::none()) {
            break c;
        }
        assert!(Instant::now() < deadline, "helper server did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let before = rss_kib(child.id());
    let mut s = c
        .call(
            COUNT,
            &Blob {
                data: vec![],
                n: MESSAGES,
                size: SIZE,
            },
            opts(true),
        )
        .unwrap();
    let first: Blob = s.recv().unwrap().unwrap();
    assert_eq!(first.n, 0);
    // Stop reading: the writer must block on flow control, not buffer the gigabyte.
    let mut peak = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss_kib(child.id()));
    }
    eprintln!("writer RSS before={before} KiB peak while stalled={peak} KiB bound={BOUND_KIB} KiB");
    assert!(
        peak < BOUND_KIB,
        "writer RSS {peak} KiB exceeds {BOUND_KIB} KiB"
    );
    // Now read everything: the stream completes, in order.
    for i in 1..MESSAGES {
        let m: Blob = s.recv().unwrap().unwrap();
        assert_eq!(m.n, i);
        if i % 4096 == 0 {
            peak = peak.max(rss_kib(child.id()));
        }
    }
    assert!(s.recv::<Blob>().unwrap().is_none());
    eprintln!("writer RSS peak over the whole 1 GiB stream={peak} KiB");
    assert!(peak < BOUND_KIB);
    drop(child.stdin.take());
    let _ = child.wait();
}

#[test]
fn split_stream_sends_and_receives_from_two_threads() {
    let srv = TestServer::start();
    let c = srv.client();
    let s = c.call(BIDI, &Blob::default(), opts(false)).unwrap();
    let (tx, rx) = s.split();
    let sender = std::thread::spawn(move || {
        for i in 0..500u64 {
            tx.send(&Blob {
                data: vec![7; 30_000],
                n: i,
                size: 0,
            })
            .unwrap();
        }
        tx.close_send().unwrap();
    });
    for i in 0..500u64 {
        let m: Blob = rx.recv().unwrap().unwrap();
        assert_eq!(m.n, i);
    }
    assert!(rx.recv::<Blob>().unwrap().is_none());
    sender.join().unwrap();
}

/// A parked receiver gives its thread up: with no call reading the connection, its pump
/// reads, and the wake runs once a message arrives, again at the stream's end, and on the
/// connection's death; `recv_within` reports a quiet stream without ending it.
#[test]
fn parked_receivers_are_woken_by_the_connection_pump() {
    let srv = TestServer::start();
    let c = srv.client();
    let s = c.call(BIDI, &Blob::default(), opts(false)).unwrap();
    let (tx, rx) = s.split();
    // Quiet: `None`, and the stream is still there.
    let t = Instant::now();
    assert!(rx
        .recv_within::<Blob>(Duration::from_millis(100))
        .unwrap()
        .is_none());
    assert!(t.elapsed() >= Duration::from_millis(100));
    let woken = || {
        let (wtx, wrx) = std::sync::mpsc::channel::<()>();
        let wake: proto::rpc::Wake = Box::new(move || {
            let _ = wtx.send(());
        });
        (wake, wrx)
    };
    for round in 1..=3u64 {
        let (wake, wrx) = woken();
        assert!(
            rx.park(wake).is_ok(),
            "round {round}: nothing to receive yet"
        );
        // Not woken while nothing arrives.
        assert!(wrx.recv_timeout(Duration::from_millis(50)).is_err());
        // The echo arrives with no thread receiving: the pump reads it.
        tx.send(&Blob {
            data: vec![1; 1000],
            n: round,
            size: 0,
        })
        .unwrap();
        wrx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("round {round}: not woken"));
        let m: Blob = rx.recv_within(Duration::ZERO).unwrap().unwrap().unwrap();
        assert_eq!(m.n, round);
    }
    // Something waiting already: the wake comes back at once.
    tx.send(&Blob {
        n: 9,
        ..Blob::default()
    })
    .unwrap();
    let (wake, wrx) = woken();
    if rx.park(wake).is_ok() {
        wrx.recv_timeout(Duration::from_secs(10)).expect("woken");
    }
    let (wake, _wrx) = woken();
    assert!(rx.park(wake).is_err());
    let m: Blob = rx.recv().unwrap().unwrap();
    assert_eq!(m.n, 9);
    // The stream's end wakes it.
    let (wake, wrx) = woken();
    assert!(rx.park(wake).is_ok());
    tx.close_send().unwrap();
    wrx.recv_timeout(Duration::from_secs(10))
        .expect("woken by the end");
    assert_eq!(rx.recv_within::<Blob>(Duration::ZERO).unwrap(), Some(None));

    // The connection's death wakes a parked receiver.
    let s = c.call(BIDI, &Blob::default(), opts(false)).unwrap();
    let (_tx, rx) = s.split();
    let (wake, wrx) = woken();
    assert!(rx.park(wake).is_ok());
    c.close();
    wrx.recv_timeout(Duration::from_secs(10))
        .expect("woken by the connection's death");
    assert!(rx.recv_within::<Blob>(Duration::ZERO).is_err());
}

#[test]
fn payload_sends_arrive_intact_and_in_order() {
    let srv = TestServer::start();
    let c = srv.client();
    let mut s = c
        .call(
            PAYLOAD,
            &Blob {
                data: vec![],
                n: 400,
                size: 0,
            },
            opts(true),
        )
        .unwrap();
    for i in 0..400u64 {
        let m: Blob = s.recv().unwrap().expect("message");
        assert_eq!((m.n, m.size), (i, 7));
        assert!(m.data == payload_for(i), "payload {i} differs");
        if i % 50 == 0 {
            // Stall now and then so the server's socket fills and segments queue up.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(s.recv::<Blob>().unwrap().is_none());
}

/// A Unix socket path appears only once it listens: a client that connects the moment the
/// path exists is never refused (bind() alone would create the path before listen()).
#[test]
fn unix_path_appears_only_when_listening() {
    let dir = TempDir::new("appear");
    // The second path is long enough that the temporary-name suffix does not fit sun_path.
    let long = "x".repeat(100 - dir.path.as_os_str().len().min(99));
    for name in ["s.sock".to_string(), long] {
        let path = dir.path.join(&name);
        for round in 0..2000 {
            let p = path.clone();
            let t = std::thread::spawn(move || {
                let svc = std::sync::Arc::new(TestService {
                    stats: Default::default(),
                    secret: None,
                });
                let mut server = proto::rpc::Server::new(ServerConfig::new("appear"), svc).unwrap();
                server.listen_unix(&p).unwrap();
                server
            });
            let t0 = Instant::now();
            while !path.exists() {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "path never appeared"
                );
                std::hint::spin_loop();
            }
            if name == "s.sock" {
                if let Err(e) = UnixStream::connect(&path) {
                    panic!("round {round}: connect as soon as the path exists: {e}");
                }
            }
            let server = t.join().unwrap();
            UnixStream::connect(&path).unwrap();
            drop(server);
            let names: Vec<_> = std::fs::read_dir(&dir.path)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![std::ffi::OsString::from(&name)]);
            std::fs::remove_file(&path).unwrap();
        }
    }
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A sender whose peer stops reading (a stalled guest's envd) waits for room without
/// burning a core, even while the peer's own bytes (here a PING) sit unread on the socket:
/// before, the waiting poll reported them readable at once, nobody took them, and the
/// sender spun on poll + send at 100 % of a core until its deadline.
#[test]
fn a_sender_blocked_by_a_stalled_peer_does_not_spin() {
    let dir = TempDir::new("stalled-peer");
    let path = dir.path.join("sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let (_, kind, _, _) = read_frame(&mut s).expect("hello");
        assert_eq!(kind, Kind::Hello);
        let ack = HelloAck {
            version: proto::PROTOCOL_VERSION,
            ..HelloAck::default()
        };
        let mut out = Vec::new();
        frame::put_frame(&mut out, 0, Kind::HelloAck, 0, &ack.encode_to_vec());
        s.write_all(&out).unwrap();
        // Wait until the client's stream is open, then send a PING and read nothing more.
        let (_, kind, _, _) = read_frame(&mut s).expect("request");
        assert_eq!(kind, Kind::Request);
        out.clear();
        frame::put_frame(&mut out, 0, Kind::Ping, 0, &[7; 8]);
        s.write_all(&out).unwrap();
        let _ = stop_rx.recv_timeout(Duration::from_secs(30));
        s
    });
    let c = Client::connect_unix(&path, Credential::none()).unwrap();
    let mut call = c
        .call(
            BIDI,
            &Blob::default(),
            CallOpts {
                timeout: Some(Duration::from_millis(1500)),
                end_stream: false,
            },
        )
        .unwrap();
    // Sends until the socket is full and the deadline passes; the stream window (well over
    // a Unix socket's buffer) never runs out first.
    let msg = Blob {
        data: vec![0x5a; 64 << 10],
        ..Blob::default()
    };
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let mut sent = 0usize;
    let err = loop {
        match call.send(&msg) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(wall.elapsed() < Duration::from_secs(20), "never blocked");
    };
    let (wall, cpu) = (wall.elapsed(), thread_cpu() - cpu);
    stop_tx.send(()).unwrap();
    drop(peer.join().unwrap());
    println!("blocked sender: {sent} messages, then {err:?}; {cpu:?} CPU in {wall:?}");
    assert_eq!(err.code, Code::DeadlineExceeded, "{err:?}");
    assert!(
        cpu < wall / 4,
        "the blocked sender used {cpu:?} of CPU in {wall:?}: it spins"
    );
}
