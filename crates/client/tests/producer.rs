//! The idempotent producer against the real server binary: batching,
//! pipelining, deduplication under lost responses and server restarts,
//! auto-claim, close, restart.

#![allow(clippy::unwrap_used)]

mod common;

use common::{name, Proxy, Server};
use durable_streams_client::{
    Client, CreateOptions, DurableStream, Error, ProducerOptions, RetryPolicy, StreamOptions,
};
use serde_json::{json, Value};
use std::time::Duration;

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 1000,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        ..RetryPolicy::default()
    }
}

async fn read_all(s: &DurableStream) -> Vec<Value> {
    s.stream(StreamOptions::new())
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Thousands of messages through batching and pipelining arrive exactly once, in order.
#[tokio::test]
async fn batches_and_pipelines_in_order() {
    let srv = Server::start(&[]);
    let s = DurableStream::create(&srv.url(&name("many")), CreateOptions::new().json())
        .await
        .unwrap();
    let opts = ProducerOptions {
        max_batch_bytes: 2048,
        max_in_flight: 8,
        ..ProducerOptions::default()
    };
    let p = s.producer("bulk", opts).unwrap();
    for i in 0..3000 {
        p.append_json(&json!({"i": i})).unwrap();
    }
    p.flush().await.unwrap();
    let stats = p.stats();
    assert!(
        stats.batches_acked > 10,
        "messages were batched into several requests: {stats:?}"
    );
    assert_eq!(stats.messages_acked, 3000);
    let items = read_all(&s).await;
    assert_eq!(items.len(), 3000);
    assert!(items.iter().enumerate().all(|(i, v)| v["i"] == json!(i)));
}

/// Byte streams: messages are concatenated in order; `send` returns the ack with the tail offset.
#[tokio::test]
async fn byte_stream_and_acks() {
    let srv = Server::start(&[]);
    let s = DurableStream::create(
        &srv.url(&name("bytes")),
        CreateOptions::new().content_type("text/plain"),
    )
    .await
    .unwrap();
    let p = s.producer("w", ProducerOptions::default()).unwrap();
    for i in 0..100 {
        p.append(format!("{i},")).unwrap();
    }
    let ack = p.send("end").await.unwrap();
    assert!(!ack.duplicate);
    p.flush().await.unwrap();
    assert_eq!(
        ack.offset.as_deref(),
        Some(s.head().await.unwrap().next_offset.as_str())
    );
    let text = s
        .stream(StreamOptions::new())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let expected: String = (0..100).map(|i| format!("{i},")).collect::<String>() + "end";
    assert_eq!(text, expected);
}

/// Lost responses are retried and deduplicated by the server: no message is duplicated or lost.
#[tokio::test]
async fn dedup_when_responses_are_lost() {
    let srv = Server::start(&[]);
    let proxy = Proxy::start(srv.addr).await;
    let client = Client::builder()
        .retry_policy(fast_retry())
        .build()
        .unwrap();
    let s = DurableStream::create_with_client(
        &client,
        &proxy.url(&name("lost")),
        CreateOptions::new().json(),
    )
    .await
    .unwrap();
    let p = s
        .producer(
            "flaky",
            ProducerOptions {
                max_batch_bytes: 64,
                max_in_flight: 4,
                ..ProducerOptions::default()
            },
        )
        .unwrap();
    for round in 0..5 {
        proxy.drop_responses(2);
        for i in 0..20 {
            p.append_json(&json!(round * 20 + i)).unwrap();
        }
        p.flush().await.unwrap();
    }
    assert_eq!(proxy.dropped(), 10);
    assert!(
        p.stats().duplicates >= 1,
        "at least one retry was answered as a duplicate: {:?}",
        p.stats()
    );
    let items: Vec<Value> = read_all(&s).await;
    assert_eq!(items, (0..100).map(|i| json!(i)).collect::<Vec<_>>());
}

/// Exactly once across a server restart: the response of a batch is lost, the server restarts from
/// its data directory, and the producer's retry is recognised as a duplicate.
#[tokio::test]
async fn dedup_across_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_string();
    let srv = Server::start(&["--data-dir", &data_dir]);
    let proxy = Proxy::start(srv.addr).await;
    let client = Client::builder()
        .retry_policy(fast_retry())
        .build()
        .unwrap();
    let s = DurableStream::create_with_client(
        &client,
        &proxy.url(&name("restart")),
        CreateOptions::new().json(),
    )
    .await
    .unwrap();
    let p = s.producer("durable", ProducerOptions::default()).unwrap();
    p.send(serde_json::to_vec(&json!("first")).unwrap())
        .await
        .unwrap();
    // Lose the response of the next batch, then refuse connections while the server restarts.
    proxy.refuse_after_drop(true);
    proxy.drop_responses(1);
    let p2 = std::sync::Arc::new(p);
    let sender = {
        let p = p2.clone();
        tokio::spawn(async move { p.send(serde_json::to_vec(&json!("second")).unwrap()).await })
    };
    while proxy.dropped() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    srv.kill();
    let srv2 = Server::start(&["--data-dir", &data_dir]);
    proxy.set_upstream(srv2.addr);
    proxy.refuse(false);
    let ack = sender.await.unwrap().unwrap();
    assert!(
        ack.duplicate,
        "the retry after the restart was deduplicated: {ack:?}"
    );
    p2.send(serde_json::to_vec(&json!("third")).unwrap())
        .await
        .unwrap();
    assert_eq!(
        read_all(&s).await,
        vec![json!("first"), json!("second"), json!("third")]
    );
}

/// A newer epoch fences the old producer (StaleEpoch); auto-claim takes over with epoch+1.
#[tokio::test]
async fn epochs_fencing_and_auto_claim() {
    let srv = Server::start(&[]);
    let s = DurableStream::create(&srv.url(&name("epoch")), CreateOptions::new().json())
        .await
        .unwrap();
    let newer = s
        .producer(
            "id",
            ProducerOptions {
                epoch: 3,
                ..ProducerOptions::default()
            },
        )
        .unwrap();
    newer.append_json(&json!("from epoch 3")).unwrap();
    newer.flush().await.unwrap();
    let zombie = s
        .producer(
            "id",
            ProducerOptions {
                epoch: 1,
                ..ProducerOptions::default()
            },
        )
        .unwrap();
    zombie.append_json(&json!("zombie")).unwrap();
    let e = zombie.flush().await.unwrap_err();
    assert!(e.to_string().contains("epoch"), "{e}");
    assert!(matches!(
        zombie.append_json(&json!(1)),
        Err(Error::ProducerFailed(_))
    ));
    let claimer = s
        .producer(
            "id",
            ProducerOptions {
                auto_claim: true,
                ..ProducerOptions::default()
            },
        )
        .unwrap();
    for i in 0..10 {
        claimer.append_json(&json!(i)).unwrap();
    }
    claimer.flush().await.unwrap();
    assert_eq!(claimer.epoch(), 4);
    let items = read_all(&s).await;
    assert_eq!(items[0], json!("from epoch 3"));
    assert_eq!(
        &items[1..],
        (0..10).map(|i| json!(i)).collect::<Vec<_>>().as_slice()
    );
    // restart(): a new session with the next epoch, accepted by the server.
    claimer.restart().await.unwrap();
    assert_eq!(claimer.epoch(), 5);
    claimer.append_json(&json!("after restart")).unwrap();
    claimer.flush().await.unwrap();
    assert_eq!(read_all(&s).await.last(), Some(&json!("after restart")));
}

/// close(final) flushes, appends the final message and closes atomically; a second close returns the same outcome.
#[tokio::test]
async fn close_with_final_message() {
    let srv = Server::start(&[]);
    let s = DurableStream::create(&srv.url(&name("pclose")), CreateOptions::new().json())
        .await
        .unwrap();
    let p = s.producer("closer", ProducerOptions::default()).unwrap();
    for i in 0..5 {
        p.append_json(&json!(i)).unwrap();
    }
    let out = p
        .close(Some(serde_json::to_vec(&json!("bye")).unwrap().into()))
        .await
        .unwrap();
    let again = p.close(None).await.unwrap();
    assert_eq!(out, again);
    let info = s.head().await.unwrap();
    assert!(info.closed);
    assert_eq!(info.next_offset, out.final_offset);
    let mut items = read_all(&s).await;
    assert_eq!(items.pop(), Some(json!("bye")));
    assert_eq!(items, (0..5).map(|i| json!(i)).collect::<Vec<_>>());
    assert!(matches!(
        p.append_json(&json!(9)),
        Err(Error::ProducerClosed)
    ));
}

/// A producer writing to a stream closed by someone else fails with the stream-closed error.
#[tokio::test]
async fn producer_on_closed_stream_fails() {
    let srv = Server::start(&[]);
    let s = DurableStream::create(&srv.url(&name("shut")), CreateOptions::new().json())
        .await
        .unwrap();
    s.close().await.unwrap();
    let p = s.producer("late", ProducerOptions::default()).unwrap();
    let e = p.send(b"1".to_vec()).await.unwrap_err();
    assert!(e.to_string().contains("closed"), "{e}");
}

/// max_batch_items caps the messages per batch (and 0 is rejected).
#[tokio::test]
async fn max_batch_items_caps_batches() {
    let srv = Server::start(&[]);
    let s = DurableStream::create(&srv.url(&name("items")), CreateOptions::new().json())
        .await
        .unwrap();
    assert!(matches!(
        s.producer(
            "p",
            ProducerOptions {
                max_batch_items: 0,
                ..ProducerOptions::default()
            }
        ),
        Err(Error::InvalidArgument(_))
    ));
    let opts = ProducerOptions {
        max_batch_items: 3,
        linger: Duration::from_secs(5),
        ..ProducerOptions::default()
    };
    let p = s.producer("p", opts).unwrap();
    for i in 0..10 {
        p.append_json(&json!(i)).unwrap();
    }
    p.flush().await.unwrap();
    assert_eq!(p.stats().batches_acked, 4, "3 + 3 + 3 + 1");
    assert_eq!(
        read_all(&s).await,
        (0..10).map(|i| json!(i)).collect::<Vec<_>>()
    );
}

/// close() reports the server's typed error (a final message on a stream closed by someone else is StreamClosed).
#[tokio::test]
async fn close_errors_are_typed() {
    let srv = Server::start(&[]);
    let s = DurableStream::create(
        &srv.url(&name("closed")),
        CreateOptions::new().content_type("text/plain"),
    )
    .await
    .unwrap();
    s.close().await.unwrap();
    let p = s.producer("late", ProducerOptions::default()).unwrap();
    let e = p.close(Some("final".into())).await.unwrap_err();
    assert!(matches!(e, Error::StreamClosed { .. }), "{e:?}");
}

/// A 409 gap answer that reaches the client after its predecessor's
/// acknowledgement (the responses crossed) makes the producer re-send that
/// batch instead of failing. A scripted server orders the two responses.
#[tokio::test]
async fn crossed_gap_answer_is_resent() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::mpsc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Seq 1 is acknowledged first; only then is seq 2 (which overtook it) answered 409.
    let (seq1_answered, wait_seq1) = mpsc::channel::<()>();
    let wait_seq1 = std::sync::Arc::new(std::sync::Mutex::new(wait_seq1));
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (seq1_answered, wait_seq1, log) =
                (seq1_answered.clone(), wait_seq1.clone(), log2.clone());
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push_str(&line.to_ascii_lowercase());
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let header = |n: &str| {
                        head.lines()
                            .find_map(|l| l.strip_prefix(n))
                            .map(|v| v.trim().to_string())
                    };
                    let len: usize = header("content-length:")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let seq = header("producer-seq:");
                    let ok = |seq: &str| {
                        format!("HTTP/1.1 200 OK\r\nstream-next-offset: 0_{seq}\r\nproducer-epoch: 0\r\nproducer-seq: {seq}\r\ncontent-length: 0\r\n\r\n")
                    };
                    let resp = match seq.as_deref() {
                        None => "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nstream-next-offset: 0_0\r\ncontent-length: 0\r\n\r\n".to_string(),
                        Some("1") => {
                            std::thread::sleep(Duration::from_millis(100)); // let seq 2 overtake it
                            let resp = ok("1");
                            w.write_all(resp.as_bytes()).unwrap();
                            seq1_answered.send(()).unwrap();
                            log.lock().unwrap().push("1".into());
                            continue;
                        }
                        Some("2") if !log.lock().unwrap().contains(&"2-gap".to_string()) => {
                            wait_seq1.lock().unwrap().recv().unwrap();
                            std::thread::sleep(Duration::from_millis(50)); // the client has the ack by now
                            log.lock().unwrap().push("2-gap".into());
                            "HTTP/1.1 409 Conflict\r\nproducer-expected-seq: 1\r\nproducer-received-seq: 2\r\ncontent-length: 0\r\n\r\n".to_string()
                        }
                        Some(s) => {
                            log.lock().unwrap().push(s.to_string());
                            ok(s)
                        }
                    };
                    w.write_all(resp.as_bytes()).unwrap();
                }
            });
        }
    });
    let s = DurableStream::new(&format!("http://{addr}/crossed")).unwrap();
    let p = s
        .producer(
            "p",
            ProducerOptions {
                max_batch_bytes: 1,
                max_in_flight: 4,
                linger: Duration::ZERO,
                ..ProducerOptions::default()
            },
        )
        .unwrap();
    p.send("a").await.unwrap(); // seq 0 establishes the epoch alone
    p.append("b").unwrap();
    p.append("c").unwrap();
    p.flush().await.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        vec!["0", "1", "2-gap", "2"],
        "seq 2 was re-sent after its crossed 409"
    );
}
