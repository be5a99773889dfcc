//! The real client against scripted hostile agents over `duplex`: whatever
//! the guest sends, the host's memory stays bounded, every call ends, and
//! the failure is one the caller treats as a broken VM.

use std::time::Duration;

use ember_wire::{
    decode, encode, ExecRequest, ExitStatus, FrameDecoder, HelloReply, Request, RequestBody, Response,
    ResponseBody, Stream, MAX_FRAME_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

/// The guest's end: reads the host's requests, answers as a test says.
struct Guest {
    io: DuplexStream,
    decoder: FrameDecoder,
}

impl Guest {
    async fn next_request(&mut self) -> Request {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(frame) = self.decoder.next_frame() {
                return decode::<Request>(&frame.expect("a whole frame")).expect("a request");
            }
            let n = self.io.read(&mut buf).await.expect("read");
            assert!(n > 0, "host hung up");
            self.decoder.push(&buf[..n]);
        }
    }

    async fn send(&mut self, id: u64, body: ResponseBody) -> std::io::Result<()> {
        let frame = encode(&Response { id, body }).expect("encode");
        self.io.write_all(&frame).await
    }
}

fn pair(timeouts: CallTimeouts) -> (AgentClient, Guest) {
    // A small pipe: a flooding guest is paced by the host's reading.
    let (host, guest) = tokio::io::duplex(64 * 1024);
    (
        AgentClient::with_timeouts(host, timeouts),
        Guest { io: guest, decoder: FrameDecoder::new(MAX_FRAME_LEN) },
    )
}

fn quick() -> CallTimeouts {
    CallTimeouts { quick: Duration::from_secs(2), slow: Duration::from_secs(4) }
}

fn hello_reply(nonce: u64) -> ResponseBody {
    ResponseBody::Hello(HelloReply {
        nonce,
        protocol: ember_wire::PROTOCOL_VERSION,
        agent_version: "hostile".into(),
        uptime_ms: 0,
        python_ready: None,
    })
}

fn exec_with_limit(limit: u64) -> ExecRequest {
    let mut r = crate::shell("yes");
    r.output_limit = limit;
    r
}

#[tokio::test]
async fn output_past_the_limit_is_cut_on_the_host_and_a_flood_ends_the_call() {
    let (client, mut guest) = pair(quick());
    let agent = tokio::spawn(async move {
        let req = guest.next_request().await;
        // 4 MiB in 64 KiB chunks for a call allowed 100 000 bytes.
        for _ in 0..64 {
            if guest
                .send(req.id, ResponseBody::Output { stream: Stream::Stdout, data: vec![b'y'; 64 << 10] })
                .await
                .is_err()
            {
                break;
            }
        }
        guest
    });
    let mut h = client.exec(exec_with_limit(100_000)).await.unwrap();
    let mut kept = 0usize;
    let err = loop {
        match h.next().await {
            Ok(ExecEvent::Output { data, .. }) => kept += data.len(),
            Ok(ExecEvent::Exit(st)) => panic!("no exit was sent: {st:?}"),
            Ok(ExecEvent::Dropped { .. }) => panic!("an exec has no dropped output"),
            Err(e) => break e,
        }
    };
    assert_eq!(kept, 100_000, "exactly the limit reached the caller");
    assert!(matches!(err, AgentError::OutputPastLimit { limit: 100_000, .. }), "{err}");
    drop(agent);
}

#[tokio::test]
async fn a_little_output_past_the_limit_is_dropped_and_the_exit_says_truncated() {
    let (client, mut guest) = pair(quick());
    let agent = tokio::spawn(async move {
        let req = guest.next_request().await;
        guest
            .send(req.id, ResponseBody::Output { stream: Stream::Stdout, data: vec![b'a'; 700] })
            .await
            .unwrap();
        guest
            .send(req.id, ResponseBody::Output { stream: Stream::Stderr, data: vec![b'b'; 700] })
            .await
            .unwrap();
        guest
            .send(req.id, ResponseBody::Exit(ExitStatus { code: Some(0), ..ExitStatus::default() }))
            .await
            .unwrap();
        guest
    });
    let out = client.run(exec_with_limit(1000)).await.unwrap();
    assert_eq!((out.stdout.len(), out.stderr.len()), (700, 300));
    assert!(out.status.truncated);
    drop(agent);
}

#[tokio::test]
async fn output_nobody_reads_is_buffered_up_to_a_bound_then_the_call_fails() {
    let (client, mut guest) = pair(quick());
    let sender = tokio::spawn(async move {
        let req = guest.next_request().await;
        let chunk = vec![b'z'; 1 << 20];
        // Up to 32 MiB: more than the host may hold for an unread call.
        for _ in 0..32 {
            if guest
                .send(req.id, ResponseBody::Output { stream: Stream::Stdout, data: chunk.clone() })
                .await
                .is_err()
            {
                break;
            }
        }
        guest
    });
    // A large limit: only the buffering bound applies. Nobody reads yet.
    let mut h = client.exec(exec_with_limit(1 << 40)).await.unwrap();
    let guest = tokio::time::timeout(Duration::from_secs(20), sender)
        .await
        .expect("the guest was never blocked")
        .unwrap();
    assert!(
        h.buffered.load(Ordering::Relaxed) <= MAX_BUFFERED_PER_REQUEST,
        "held {} bytes",
        h.buffered.load(Ordering::Relaxed)
    );
    let err = loop {
        match h.next().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, AgentError::Overflow { .. }), "{err}");
    drop(guest);
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_answers_costs_a_timeout_not_a_stuck_call() {
    let (client, guest) = pair(quick());
    let t = tokio::time::Instant::now();
    let err = client.hello(1).await.unwrap_err();
    assert!(matches!(err, AgentError::Timeout { what: "hello", .. }), "{err}");
    assert_eq!(t.elapsed(), Duration::from_secs(2));
    let err = client.scrub().await.unwrap_err();
    assert!(matches!(err, AgentError::Timeout { what: "scrub", .. }), "{err}");
    assert!(client.pending.lock().unwrap().is_empty(), "timed-out calls are forgotten");
    drop(guest);
}

#[tokio::test]
async fn replies_for_unknown_ids_and_second_answers_are_ignored() {
    let (client, mut guest) = pair(quick());
    let agent = tokio::spawn(async move {
        let req = guest.next_request().await;
        // Noise first: replies to requests nobody made, many stray errors.
        for id in [9_999, 12_345] {
            guest.send(id, ResponseBody::Ok).await.unwrap();
            guest
                .send(id, ResponseBody::Output { stream: Stream::Stdout, data: vec![1; 1000] })
                .await
                .unwrap();
        }
        for _ in 0..1000 {
            let e = ember_wire::ErrorReply::new(ember_wire::ErrorCode::BadFrame, "x");
            guest.send(0, ResponseBody::Error(e)).await.unwrap();
        }
        let RequestBody::Hello { nonce } = req.body else { panic!("not hello") };
        guest.send(req.id, hello_reply(nonce)).await.unwrap();
        guest.send(req.id, hello_reply(nonce + 1)).await.unwrap(); // answered twice
        let req = guest.next_request().await;
        let RequestBody::Hello { nonce } = req.body else { panic!("not hello") };
        guest.send(req.id, hello_reply(nonce)).await.unwrap();
        guest
    });
    assert_eq!(client.hello(5).await.unwrap().nonce, 5);
    assert_eq!(client.hello(6).await.unwrap().nonce, 6, "the second answer went nowhere");
    assert!(client.stray.lock().await.len() <= MAX_STRAY, "stray errors are bounded");
    drop(agent);
}

#[tokio::test]
async fn garbage_from_the_agent_closes_the_channel_and_fails_every_call() {
    let (client, mut guest) = pair(quick());
    let agent = tokio::spawn(async move {
        let _ = guest.next_request().await;
        // A frame of the right length that is not a response.
        let junk = b"\\x00 not json at all";
        let mut frame = (junk.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(junk);
        guest.io.write_all(&frame).await.unwrap();
        guest
    });
    let err = client.hello(1).await.unwrap_err();
    assert!(matches!(err, AgentError::Disconnected), "{err}");
    let err = client.hello(2).await.unwrap_err();
    assert!(matches!(err, AgentError::Disconnected), "later calls fail at once: {err}");
    drop(agent);
}

#[tokio::test]
async fn requests_in_flight_are_bounded_per_channel() {
    let (client, _guest) = pair(quick());
    let mut handles = Vec::new();
    for _ in 0..MAX_IN_FLIGHT {
        handles.push(client.exec(exec_with_limit(10)).await.unwrap());
    }
    let err = client.exec(exec_with_limit(10)).await.unwrap_err();
    assert!(matches!(err, AgentError::TooManyInFlight { limit: MAX_IN_FLIGHT }), "{err}");
    drop(handles);
}
