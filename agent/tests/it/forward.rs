//! The one forwarding path (PROTOCOL.md §9) against a real envd: every forwarded method of
//! the table reaches envd and answers, and envd's 64 KiB chunks reach a client that
//! announced a 16 KiB frame limit cut into pieces, bytes and offsets intact.

use std::collections::BTreeSet;
use std::time::Duration;

use proto::gen::wrenn::agent::v1 as pb;
use proto::gen::wrenn::envd::v1 as envd;
use proto::rpc::{CallOpts, Client, ClientConfig, ClientStream, Credential};

use crate::service::{sb, Rig, TOKEN};

fn stream_all<M: prost::Message + Default>(mut s: ClientStream) -> Vec<M> {
    let mut v = Vec::new();
    while let Some(m) = s.recv::<M>().unwrap() {
        v.push(m);
    }
    v
}

fn by_pid(pid: u32) -> Option<envd::ProcessSelector> {
    Some(envd::ProcessSelector {
        selector: Some(envd::process_selector::Selector::Pid(pid)),
    })
}

fn background(c: &Client, tag: &str, cmd: &str, args: &[&str], stdin: bool, pty: bool) -> u32 {
    // Started through ExecStream and detached after its first event: Exec would close the
    // stdin it feeds (ExecRequest.stdin), and these processes must keep theirs open.
    let mut s = c
        .call(
            pb::processes_methods::EXEC_STREAM,
            &pb::ExecStreamRequest {
                sandbox_id: sb(1),
                process: Some(envd::ProcessConfig {
                    cmd: cmd.into(),
                    args: args.iter().map(|s| s.to_string()).collect(),
                    tag: tag.into(),
                    stdin,
                    pty: pty.then_some(envd::PtySize { rows: 24, cols: 80 }),
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: None,
                end_stream: true,
            },
        )
        .unwrap();
    let first: envd::ProcessEvent = s.recv().unwrap().expect("a started event");
    let Some(envd::process_event::Event::Started(st)) = first.event else {
        panic!("first event is not started: {first:?}");
    };
    assert!(st.pid > 0);
    st.pid
}

#[test]
fn every_forwarded_method_reaches_envd() {
    let rig = Rig::new("fwd-all");
    let c = rig.client();
    rig.create(&c, 1);
    let mut covered = BTreeSet::new();
    let ends = CallOpts {
        timeout: Some(Duration::from_secs(30)),
        end_stream: true,
    };

    // Sandboxes.Metrics: envd Metrics.Get.
    let m: envd::GetMetricsResponse = c
        .unary(
            pb::sandboxes_methods::METRICS,
            &pb::SandboxMetricsRequest { sandbox_id: sb(1) },
            None,
        )
        .unwrap();
    assert!(m.cpu_count > 0, "{m:?}");
    covered.insert(pb::sandboxes_methods::METRICS);

    // Processes.ExecStream: started, the output, exited.
    let s = c
        .call(
            pb::processes_methods::EXEC_STREAM,
            &pb::ExecStreamRequest {
                sandbox_id: sb(1),
                process: Some(envd::ProcessConfig {
                    cmd: "echo".into(),
                    args: vec!["forwarded".into()],
                    ..Default::default()
                }),
            },
            ends,
        )
        .unwrap();
    let evs: Vec<envd::ProcessEvent> = stream_all(s);
    use envd::process_event::Event;
    assert!(matches!(
        evs.first().and_then(|e| e.event.as_ref()),
        Some(Event::Started(_))
    ));
    assert!(matches!(
        evs.last().and_then(|e| e.event.as_ref()),
        Some(Event::Exited(_))
    ));
    let out: Vec<u8> = evs
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Output(o)) if o.stream == envd::OutputStream::Stdout as i32 => {
                Some(o.data.to_vec())
            }
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        out.starts_with(b"forwarded"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    covered.insert(pb::processes_methods::EXEC_STREAM);

    // SendInput and CloseStdin on a background cat; Connect replays what it echoed.
    let cat = background(&c, "cat", "cat", &[], true, false);
    let mut input = c
        .call(
            pb::processes_methods::SEND_INPUT,
            &pb::SendInputRequest {
                sandbox_id: sb(1),
                input: Some(envd::SendInputRequest {
                    process: by_pid(cat),
                    data: b"ab".to_vec().into(),
                    close: false,
                }),
            },
            CallOpts::default(),
        )
        .unwrap();
    input
        .send(&pb::SendInputRequest {
            sandbox_id: String::new(),
            input: Some(envd::SendInputRequest {
                process: None,
                data: b"c".to_vec().into(),
                close: false,
            }),
        })
        .unwrap();
    input.close_send().unwrap();
    let w: envd::SendInputResponse = input.recv().unwrap().unwrap();
    assert_eq!(w.bytes_written, 3);
    covered.insert(pb::processes_methods::SEND_INPUT);
    let _: envd::CloseStdinResponse = c
        .unary(
            pb::processes_methods::CLOSE_STDIN,
            &pb::CloseStdinRequest {
                sandbox_id: sb(1),
                close: Some(envd::CloseStdinRequest {
                    process: by_pid(cat),
                }),
            },
            None,
        )
        .unwrap();
    covered.insert(pb::processes_methods::CLOSE_STDIN);
    let s = c
        .call(
            pb::processes_methods::CONNECT,
            &pb::ConnectRequest {
                sandbox_id: sb(1),
                connect: Some(envd::ConnectRequest {
                    process: by_pid(cat),
                    skip_replay: false,
                }),
            },
            ends,
        )
        .unwrap();
    let evs: Vec<envd::ProcessEvent> = stream_all(s);
    let echoed: Vec<u8> = evs
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Output(o)) => Some(o.data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(echoed, b"abc");
    covered.insert(pb::processes_methods::CONNECT);

    // List, ResizePty and Signal on a sleeping process with a PTY.
    let pty = background(&c, "pty", "sleep", &["30"], false, true);
    let l: envd::ListProcessesResponse = c
        .unary(
            pb::processes_methods::LIST,
            &pb::ListProcessesRequest { sandbox_id: sb(1) },
            None,
        )
        .unwrap();
    assert!(l.processes.iter().any(|p| p.tag == "pty"), "{l:?}");
    covered.insert(pb::processes_methods::LIST);
    let _: envd::ResizePtyResponse = c
        .unary(
            pb::processes_methods::RESIZE_PTY,
            &pb::ResizePtyRequest {
                sandbox_id: sb(1),
                resize: Some(envd::ResizePtyRequest {
                    process: by_pid(pty),
                    size: Some(envd::PtySize {
                        rows: 40,
                        cols: 100,
                    }),
                }),
            },
            None,
        )
        .unwrap();
    covered.insert(pb::processes_methods::RESIZE_PTY);
    let _: envd::SignalResponse = c
        .unary(
            pb::processes_methods::SIGNAL,
            &pb::SignalRequest {
                sandbox_id: sb(1),
                signal: Some(envd::SignalRequest {
                    process: by_pid(pty),
                    signal: envd::Signal::Sigkill as i32,
                    group: false,
                }),
            },
            None,
        )
        .unwrap();
    covered.insert(pb::processes_methods::SIGNAL);

    // Files: mkdir, write, stat, list, read, move, remove, watch.
    let dir = format!("/tmp/wrenn-fwd-{}", std::process::id());
    let mk: envd::MakeDirResponse = c
        .unary(
            pb::files_methods::MAKE_DIR,
            &pb::MakeDirRequest {
                sandbox_id: sb(1),
                make_dir: Some(envd::MakeDirRequest {
                    path: dir.clone(),
                    ..Default::default()
                }),
            },
            None,
        )
        .unwrap();
    assert!(mk.entry.is_some());
    covered.insert(pb::files_methods::MAKE_DIR);
    let file = format!("{dir}/a");
    let mut w = c
        .call(
            pb::files_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    sandbox_id: sb(1),
                    file: Some(envd::WriteHeader {
                        path: file.clone(),
                        ..Default::default()
                    }),
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    w.send(&pb::WriteRequest {
        msg: Some(pb::write_request::Msg::Data(b"12345".to_vec().into())),
    })
    .unwrap();
    w.send(&pb::WriteRequest {
        msg: Some(pb::write_request::Msg::Crc32(crc32fast::hash(b"12345"))),
    })
    .unwrap();
    w.close_send().unwrap();
    let wr: envd::WriteResponse = w.recv().unwrap().unwrap();
    assert_eq!(wr.bytes_written, 5);
    covered.insert(pb::files_methods::WRITE);
    let st: envd::StatResponse = c
        .unary(
            pb::files_methods::STAT,
            &pb::StatRequest {
                sandbox_id: sb(1),
                stat: Some(envd::StatRequest {
                    path: file.clone(),
                    ..Default::default()
                }),
            },
            None,
        )
        .unwrap();
    assert_eq!(st.entry.unwrap().size, 5);
    covered.insert(pb::files_methods::STAT);
    let s = c
        .call(
            pb::files_methods::LIST,
            &pb::ListDirRequest {
                sandbox_id: sb(1),
                list: Some(envd::ListDirRequest {
                    path: dir.clone(),
                    depth: 1,
                    ..Default::default()
                }),
            },
            ends,
        )
        .unwrap();
    let batches: Vec<envd::ListDirResponse> = stream_all(s);
    assert!(batches
        .iter()
        .flat_map(|b| &b.entries)
        .any(|e| e.path == file));
    covered.insert(pb::files_methods::LIST);
    let s = c
        .call(
            pb::files_methods::READ,
            &pb::ReadRequest {
                sandbox_id: sb(1),
                read: Some(envd::ReadRequest {
                    path: file.clone(),
                    ..Default::default()
                }),
            },
            ends,
        )
        .unwrap();
    let parts: Vec<envd::ReadResponse> = stream_all(s);
    let back: Vec<u8> = parts.iter().flat_map(|p| p.data.to_vec()).collect();
    assert_eq!(back, b"12345");
    covered.insert(pb::files_methods::READ);
    let moved = format!("{dir}/b");
    let _: envd::MoveResponse = c
        .unary(
            pb::files_methods::MOVE,
            &pb::MoveRequest {
                sandbox_id: sb(1),
                r#move: Some(envd::MoveRequest {
                    source: file.clone(),
                    destination: moved.clone(),
                    ..Default::default()
                }),
            },
            None,
        )
        .unwrap();
    covered.insert(pb::files_methods::MOVE);
    let mut wt = c
        .call(
            pb::files_methods::WATCH,
            &pb::WatchRequest {
                sandbox_id: sb(1),
                watch: Some(envd::WatchRequest {
                    path: dir.clone(),
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: None,
                end_stream: true,
            },
        )
        .unwrap();
    let started: envd::WatchResponse = wt.recv().unwrap().unwrap();
    assert!(matches!(
        started.msg,
        Some(envd::watch_response::Msg::Started(_))
    ));
    drop(wt);
    covered.insert(pb::files_methods::WATCH);
    let _: envd::RemoveResponse = c
        .unary(
            pb::files_methods::REMOVE,
            &pb::RemoveRequest {
                sandbox_id: sb(1),
                remove: Some(envd::RemoveRequest {
                    path: dir.clone(),
                    recursive: true,
                    ..Default::default()
                }),
            },
            None,
        )
        .unwrap();
    covered.insert(pb::files_methods::REMOVE);

    // Every agent.v1 route of the table was called.
    let table: BTreeSet<&str> = proto::gen::forward::ROUTES
        .iter()
        .filter(|r| r.method.starts_with("wrenn.agent.v1."))
        .map(|r| r.method)
        .collect();
    assert_eq!(covered, table);
}

/// envd reads files in 64 KiB chunks and sends process output in chunks as large; a client
/// announcing the smallest frame limit the protocol allows gets them in pieces that fit.
#[test]
fn a_client_with_a_small_frame_limit_gets_envd_chunks_in_pieces() {
    let rig = Rig::new("fwd-small");
    let c = rig.client();
    rig.create(&c, 1);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let path = format!("/tmp/wrenn-fwd-small-{}", std::process::id());
    let mut w = c
        .call(
            pb::files_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    sandbox_id: sb(1),
                    file: Some(envd::WriteHeader {
                        path: path.clone(),
                        ..Default::default()
                    }),
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    for chunk in data.chunks(64 * 1024) {
        w.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Data(chunk.to_vec().into())),
        })
        .unwrap();
    }
    w.close_send().unwrap();
    let _: envd::WriteResponse = w.recv().unwrap().unwrap();

    let small = Client::connect_tcp_with(
        rig.addr,
        Credential::agent_token(TOKEN),
        &ClientConfig {
            frame_len_max: proto::limits::FRAME_LEN_MAX_FLOOR,
            ..Default::default()
        },
    )
    .unwrap();
    let s = small
        .call(
            pb::files_methods::READ,
            &pb::ReadRequest {
                sandbox_id: sb(1),
                read: Some(envd::ReadRequest {
                    path: path.clone(),
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: Some(Duration::from_secs(60)),
                end_stream: true,
            },
        )
        .unwrap();
    let parts: Vec<envd::ReadResponse> = stream_all(s);
    let mut back = Vec::new();
    let mut crc = None;
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(
            p.entry.is_some(),
            i == 0,
            "metadata in the first piece only"
        );
        if !p.data.is_empty() {
            assert_eq!(p.offset, back.len() as u64, "piece {i}: offset");
        }
        back.extend_from_slice(&p.data);
        crc = crc.or(p.crc32);
    }
    assert!(back == data, "read back differs");
    assert_eq!(crc, Some(crc32fast::hash(&data)));
    // More pieces than envd's 64 KiB chunks: they were cut.
    assert!(
        parts.len() > data.len() / (16 * 1024),
        "{} pieces",
        parts.len()
    );

    // Process output: one 64 KiB read of the pipe is one envd message.
    let s = small
        .call(
            pb::processes_methods::EXEC_STREAM,
            &pb::ExecStreamRequest {
                sandbox_id: sb(1),
                process: Some(envd::ProcessConfig {
                    cmd: "cat".into(),
                    args: vec![path.clone()],
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: Some(Duration::from_secs(60)),
                end_stream: true,
            },
        )
        .unwrap();
    let evs: Vec<envd::ProcessEvent> = stream_all(s);
    let mut out = Vec::new();
    for e in &evs {
        if let Some(envd::process_event::Event::Output(o)) = &e.event {
            assert_eq!(o.stream, envd::OutputStream::Stdout as i32);
            assert_eq!(o.offset, out.len() as u64, "output offsets stay exact");
            out.extend_from_slice(&o.data);
        }
    }
    assert!(
        out == data,
        "process output differs: {} bytes of {}, first difference at {:?}, {} events",
        out.len(),
        data.len(),
        out.iter().zip(&data).position(|(a, b)| a != b),
        evs.len()
    );
    let _ = std::fs::remove_file(&path);
}
