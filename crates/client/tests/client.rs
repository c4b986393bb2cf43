//! The client against the real server binary: every operation, every live
//! mode, closure, JSON and binary streams, retries and their absence.

#![allow(clippy::unwrap_used)]

mod common;

use common::{name, Proxy, Server};
use durable_streams_client::{
    stream, AppendOptions, Client, CreateOptions, DurableStream, Error, FileOffsetStore,
    ForkOptions, LiveMode, OffsetStore, RetryPolicy, StreamOptions,
};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 20,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        ..RetryPolicy::default()
    }
}

fn args() -> Vec<&'static str> {
    vec!["--long-poll-timeout", "1s"]
}

/// Create (201, then 200 when repeated), head, append, catch-up read and delete behave per the protocol.
#[tokio::test]
async fn lifecycle_of_a_byte_stream() {
    let srv = Server::start(&args());
    let url = srv.url(&name("life"));
    let s = DurableStream::new(&url).unwrap();
    let c = s
        .create_stream(CreateOptions::new().content_type("text/plain"))
        .await
        .unwrap();
    assert!(c.created);
    let again = s
        .create_stream(CreateOptions::new().content_type("text/plain"))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.next_offset, c.next_offset);
    let a1 = s.append("hello ").await.unwrap();
    let a2 = s.append_text("world").await.unwrap();
    assert!(a1.next_offset < a2.next_offset, "offsets increase");
    let info = s.head().await.unwrap();
    assert_eq!(info.next_offset, a2.next_offset);
    assert_eq!(info.content_type.as_deref(), Some("text/plain"));
    assert!(!info.closed);
    let text = s
        .stream(StreamOptions::new())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, "hello world");
    // Reading from the first append's offset returns only what came after it.
    let rest = s
        .stream(StreamOptions::new().offset(a1.next_offset.as_str()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(rest, "world");
    s.delete().await.unwrap();
    assert!(matches!(s.head().await, Err(Error::NotFound { .. })));
    assert!(matches!(s.delete().await, Err(Error::NotFound { .. })));
}

/// Missing streams give NotFound for every operation; a bad offset gives BadRequest.
#[tokio::test]
async fn typed_errors_for_missing_streams_and_bad_input() {
    let srv = Server::start(&args());
    let s = DurableStream::new(&srv.url(&name("missing"))).unwrap();
    assert!(matches!(s.head().await, Err(Error::NotFound { .. })));
    assert!(matches!(
        s.append_with("x".into(), AppendOptions::default()).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        s.stream(StreamOptions::new()).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        s.stream(StreamOptions::new().live(LiveMode::Sse)).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(s.close().await, Err(Error::NotFound { .. })));
    s.create_stream(CreateOptions::new()).await.unwrap();
    let e = s
        .stream(StreamOptions::new().offset("not-an-offset"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BadRequest { .. }), "{e:?}");
    assert_eq!(e.status(), Some(400));
    assert!(matches!(
        s.append(Vec::<u8>::new()).await,
        Err(Error::InvalidArgument(_))
    ));
    // A different configuration for an existing stream is a conflict.
    let e = s
        .create_stream(CreateOptions::new().content_type("text/plain"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e:?}");
}

/// Create options reach the server: TTL, Expires-At, closed with an initial body; TTL with Expires-At is refused.
#[tokio::test]
async fn create_options() {
    let srv = Server::start(&args());
    let ttl = DurableStream::create(&srv.url(&name("ttl")), CreateOptions::new().ttl_secs(3600))
        .await
        .unwrap();
    assert_eq!(ttl.head().await.unwrap().ttl_secs, Some(3600));
    let at = chrono::Utc::now() + chrono::Duration::hours(1);
    let exp = DurableStream::create(&srv.url(&name("exp")), CreateOptions::new().expires_at(at))
        .await
        .unwrap();
    assert!(exp.head().await.unwrap().expires_at.is_some());
    let closed = DurableStream::create(
        &srv.url(&name("closed")),
        CreateOptions::new()
            .content_type("text/plain")
            .closed(true)
            .body("the whole content"),
    )
    .await
    .unwrap();
    let info = closed.head().await.unwrap();
    assert!(info.closed);
    let r = closed.stream(StreamOptions::new()).await.unwrap();
    assert_eq!(r.text().await.unwrap(), "the whole content");
    let both = CreateOptions {
        ttl_secs: Some(5),
        expires_at: Some(at),
        ..CreateOptions::default()
    };
    let e = DurableStream::create(&srv.url(&name("both")), both)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BadRequest { .. }), "{e:?}");
}

/// JSON streams: single values (arrays included) are one message each, batches flatten, reads decode in order.
#[tokio::test]
async fn json_stream_messages() {
    let srv = Server::start(&args());
    let s = DurableStream::create(&srv.url(&name("json")), CreateOptions::new().json())
        .await
        .unwrap();
    s.append_json(&json!({"n": 1})).await.unwrap();
    s.append_json(&json!([1, 2])).await.unwrap(); // one message that is an array
    s.append_json_batch(&[json!({"n": 3}), json!({"n": 4})])
        .await
        .unwrap();
    s.append_text("\"text value\"").await.unwrap();
    s.append_with(
        r#"[{"n":5},{"n":6}]"#.into(),
        AppendOptions {
            json_batch: true,
            ..AppendOptions::default()
        },
    )
    .await
    .unwrap();
    let items: Vec<Value> = stream(s.url().as_str(), StreamOptions::new())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        items,
        vec![
            json!({"n":1}),
            json!([1, 2]),
            json!({"n":3}),
            json!({"n":4}),
            json!("text value"),
            json!({"n":5}),
            json!({"n":6})
        ]
    );
    // Invalid JSON is the server's 400.
    assert!(matches!(
        s.append_text("{nope").await,
        Err(Error::BadRequest { .. })
    ));
    assert!(matches!(
        s.append_json_batch::<Value>(&[]).await,
        Err(Error::InvalidArgument(_))
    ));
}

/// Every byte value survives every read mode (SSE uses base64 for binary streams).
#[tokio::test]
async fn binary_stream_in_every_mode() {
    let srv = Server::start(&args());
    let s = DurableStream::create(&srv.url(&name("bin")), CreateOptions::new())
        .await
        .unwrap();
    let payload: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    s.append(payload.clone()).await.unwrap();
    s.append(b"\r\n\n\r".to_vec()).await.unwrap();
    let mut expected = payload.clone();
    expected.extend_from_slice(b"\r\n\n\r");
    for live in [
        LiveMode::Off,
        LiveMode::LongPoll,
        LiveMode::Sse,
        LiveMode::Auto,
    ] {
        let got = s
            .stream(StreamOptions::new().live(live))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&got[..], &expected[..], "{live:?}");
    }
}

/// Text with multi-byte characters and every line ending survives SSE; each batch's offset is the one after its data.
#[tokio::test]
async fn sse_text_and_offsets_after_data() {
    let srv = Server::start(&args());
    let s = DurableStream::create(
        &srv.url(&name("sse")),
        CreateOptions::new().content_type("text/plain; charset=utf-8"),
    )
    .await
    .unwrap();
    let parts = [
        "héllo 漢字 😀\n",
        " leading space\r\n",
        "\u{2028}sep\u{85}\rend",
    ];
    let mut offsets = Vec::new();
    for p in parts {
        offsets.push(s.append_text(p).await.unwrap().next_offset);
    }
    let mut r = s
        .stream(StreamOptions::new().live(LiveMode::Sse))
        .await
        .unwrap();
    let mut text = String::new();
    let mut last = String::new();
    while let Some(b) = r.next_batch().await.unwrap() {
        text.push_str(std::str::from_utf8(&b.data).unwrap());
        if !b.data.is_empty() {
            // The offset reported with data is the position after that data, a real append boundary.
            assert!(
                offsets.contains(&b.offset),
                "{} not an append boundary",
                b.offset
            );
        }
        last = b.offset.clone();
        if b.up_to_date {
            break;
        }
    }
    // SSE normalises CR and CRLF inside data lines to LF (they are SSE line ends).
    assert_eq!(
        text,
        parts.concat().replace("\r\n", "\n").replace('\r', "\n")
    );
    assert_eq!(last, offsets[2]);
}

/// Long-poll: a reader waiting at the tail receives data appended later, then EOF on close.
#[tokio::test]
async fn long_poll_follows_and_ends_on_close() {
    let srv = Server::start(&args());
    let s = DurableStream::create(
        &srv.url(&name("lp")),
        CreateOptions::new().content_type("text/plain"),
    )
    .await
    .unwrap();
    s.append_text("before").await.unwrap();
    let mut r = s
        .stream(StreamOptions::new().offset("now").live(LiveMode::LongPoll))
        .await
        .unwrap();
    let first = r.next_batch().await.unwrap().unwrap();
    assert!(
        first.up_to_date && first.data.is_empty(),
        "offset=now skips existing data"
    );
    let writer = s.clone();
    let w = tokio::spawn(async move {
        writer.append_text("after").await.unwrap();
        writer.close().await.unwrap()
    });
    let mut got = String::new();
    let mut closed = false;
    while let Some(b) = r.next_batch().await.unwrap() {
        got.push_str(std::str::from_utf8(&b.data).unwrap());
        closed = b.closed;
    }
    let final_offset = w.await.unwrap().final_offset;
    assert_eq!(got, "after");
    assert!(closed && r.closed());
    assert_eq!(r.offset(), final_offset);
}

/// Closure is EOF in every live mode: readers end with closed=true after the final message.
#[tokio::test]
async fn closure_ends_every_live_mode() {
    let srv = Server::start(&args());
    for live in [
        LiveMode::Off,
        LiveMode::LongPoll,
        LiveMode::Sse,
        LiveMode::Auto,
    ] {
        let s = DurableStream::create(&srv.url(&name("close")), CreateOptions::new().json())
            .await
            .unwrap();
        s.append_json(&json!(1)).await.unwrap();
        let out = s.close_with(b"2".to_vec()).await.unwrap();
        let r = s.stream(StreamOptions::new().live(live)).await.unwrap();
        let batches: Vec<_> = r
            .batches()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let last = batches.last().unwrap();
        assert!(last.closed, "{live:?}");
        assert_eq!(last.offset, out.final_offset, "{live:?}");
        let items: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.items::<i64>().unwrap())
            .collect();
        assert_eq!(items, vec![1, 2], "{live:?}");
        // Appending to a closed stream reports its final offset.
        match s.append_json(&json!(3)).await {
            Err(Error::StreamClosed { final_offset }) => {
                assert_eq!(final_offset, Some(out.final_offset.clone()))
            }
            other => panic!("{other:?}"),
        }
        // Closing again is idempotent.
        assert_eq!(s.close().await.unwrap().final_offset, out.final_offset);
    }
}

/// Auto mode catches up, then follows live appends over SSE until the stream closes.
#[tokio::test]
async fn auto_mode_catches_up_then_follows() {
    let srv = Server::start(&args());
    let s = DurableStream::create(&srv.url(&name("auto")), CreateOptions::new().json())
        .await
        .unwrap();
    for i in 0..3 {
        s.append_json(&json!(i)).await.unwrap();
    }
    let mut r = s
        .stream(StreamOptions::new().live(LiveMode::Auto))
        .await
        .unwrap()
        .json_batches::<i64>();
    let mut items = Vec::new();
    let mut writer_started = false;
    while let Some(b) = r.next().await {
        let b = b.unwrap();
        items.extend(b.items);
        if b.up_to_date && !writer_started {
            writer_started = true;
            let w = s.clone();
            tokio::spawn(async move {
                for i in 3..6 {
                    w.append_json(&json!(i)).await.unwrap();
                }
                w.close().await.unwrap();
            });
        }
    }
    assert_eq!(items, (0..6).collect::<Vec<_>>());
}

/// SSE readers reconnect when the server rotates connections and deliver everything exactly once.
#[tokio::test]
async fn sse_reconnects_across_server_rotation() {
    let srv = Server::start(&["--sse-reconnect-interval", "300ms"]);
    let s = DurableStream::create(&srv.url(&name("rot")), CreateOptions::new().json())
        .await
        .unwrap();
    let mut r = s
        .stream(StreamOptions::new().live(LiveMode::Sse))
        .await
        .unwrap();
    let w = s.clone();
    let writer = tokio::spawn(async move {
        for i in 0..20 {
            w.append_json(&json!(i)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await; // spreads appends over several connections
        }
        w.close().await.unwrap();
    });
    let mut items = Vec::new();
    while let Some(b) = r.next_batch().await.unwrap() {
        items.extend(b.items::<i64>().unwrap());
    }
    writer.await.unwrap();
    assert_eq!(items, (0..20).collect::<Vec<_>>());
}

/// A fork reads its source's data up to the fork offset, then its own appends; the source is unaffected.
#[tokio::test]
async fn fork_inherits_prefix() {
    let srv = Server::start(&args());
    let src = DurableStream::create(&srv.url(&name("src")), CreateOptions::new().json())
        .await
        .unwrap();
    src.append_json(&json!("a")).await.unwrap();
    let at = src.append_json(&json!("b")).await.unwrap().next_offset;
    src.append_json(&json!("c")).await.unwrap();
    let fork_path = format!("/v1/stream/{}", name("fork"));
    let fork = src
        .fork(
            &fork_path,
            ForkOptions {
                offset: Some(at),
                ..ForkOptions::default()
            },
        )
        .await
        .unwrap();
    fork.append_json(&json!("f")).await.unwrap();
    let f: Vec<String> = fork
        .stream(StreamOptions::new())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(f, ["a", "b", "f"]);
    let s: Vec<String> = src
        .stream(StreamOptions::new())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s, ["a", "b", "c"]);
    // Forking a missing source is NotFound.
    let ghost = DurableStream::new(&srv.url(&name("ghost"))).unwrap();
    assert!(matches!(
        ghost
            .fork(
                &format!("/v1/stream/{}", name("f2")),
                ForkOptions::default()
            )
            .await,
        Err(Error::NotFound { .. })
    ));
}

/// A consumer that saves its offset in a FileOffsetStore resumes exactly after what it processed.
#[tokio::test]
async fn offset_resume_with_file_store() {
    let srv = Server::start(&args());
    let dir = tempfile::tempdir().unwrap();
    let s = DurableStream::create(&srv.url(&name("resume")), CreateOptions::new().json())
        .await
        .unwrap();
    for i in 0..5 {
        s.append_json(&json!(i)).await.unwrap();
    }
    {
        let store = FileOffsetStore::new(dir.path()).unwrap();
        let mut r = s.stream(StreamOptions::new()).await.unwrap();
        let b = r.next_batch().await.unwrap().unwrap();
        assert_eq!(b.items::<i64>().unwrap(), vec![0, 1, 2, 3, 4]);
        store.save("consumer-1", &b.offset).await.unwrap();
    }
    for i in 5..8 {
        s.append_json(&json!(i)).await.unwrap();
    }
    let store = FileOffsetStore::new(dir.path()).unwrap();
    let saved = store.load("consumer-1").await.unwrap().unwrap();
    let rest: Vec<i64> = s
        .stream(StreamOptions::new().offset(saved))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest, vec![5, 6, 7]);
}

/// Stream-Seq regressions are typed SequenceConflict.
#[tokio::test]
async fn stream_seq_conflict() {
    let srv = Server::start(&args());
    let s = DurableStream::create(&srv.url(&name("seq")), CreateOptions::new())
        .await
        .unwrap();
    let with_seq = |seq: &str| AppendOptions {
        seq: Some(seq.into()),
        ..AppendOptions::default()
    };
    s.append_with("a".into(), with_seq("002")).await.unwrap();
    let e = s
        .append_with("b".into(), with_seq("001"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::SequenceConflict { .. }), "{e:?}");
}

/// Reads, HEAD, PUT and DELETE are retried through 503s (Retry-After honoured); a read with retries off fails.
#[tokio::test]
async fn idempotent_operations_are_retried() {
    let srv = Server::start(&args());
    let proxy = Proxy::start(srv.addr).await;
    // No pooling: every request opens a connection, so every injected
    // failure really lands (the proxy fails the first request of a connection).
    let unpooled = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let client = Client::builder()
        .http_client(unpooled)
        .retry_policy(fast_retry())
        .build()
        .unwrap();
    let s = DurableStream::with_client(&client, &proxy.url(&name("retry"))).unwrap();
    proxy.fail_next(2);
    s.create_stream(CreateOptions::new().content_type("text/plain"))
        .await
        .unwrap();
    assert_eq!(proxy.injected(), 2);
    s.append_text("x").await.unwrap();
    proxy.fail_next(3);
    assert_eq!(
        s.stream(StreamOptions::new())
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "x"
    );
    assert_eq!(proxy.injected(), 5);
    proxy.fail_next(2);
    s.head().await.unwrap();
    assert_eq!(proxy.injected(), 7);
    proxy.fail_next(2);
    s.delete().await.unwrap();
    assert_eq!(proxy.injected(), 9);
    let no_retry = Client::builder()
        .retry_policy(RetryPolicy::none())
        .build()
        .unwrap();
    let s2 = DurableStream::with_client(&no_retry, &proxy.url(&name("noretry"))).unwrap();
    proxy.fail_next(1);
    let e = s2.head().await.unwrap_err();
    assert_eq!(e.status(), Some(503));
    assert!(e.is_retryable());
}

/// A plain append whose response is lost is NOT retried: the error surfaces and the data is stored once.
#[tokio::test]
async fn plain_append_is_never_retried() {
    let srv = Server::start(&args());
    let proxy = Proxy::start(srv.addr).await;
    let client = Client::builder()
        .retry_policy(fast_retry())
        .build()
        .unwrap();
    let s = DurableStream::with_client(&client, &proxy.url(&name("once"))).unwrap();
    s.create_stream(CreateOptions::new().content_type("text/plain"))
        .await
        .unwrap();
    proxy.drop_responses(1);
    let e = s.append_text("once").await.unwrap_err();
    assert!(matches!(e, Error::Network(_)), "{e:?}");
    assert_eq!(proxy.dropped(), 1);
    assert_eq!(
        s.stream(StreamOptions::new())
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "once"
    );
    // A 503 on a plain append is reported, not retried (no connection
    // pooling: the proxy injects failures on new connections only).
    let unpooled = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let client = Client::builder()
        .http_client(unpooled)
        .retry_policy(fast_retry())
        .build()
        .unwrap();
    let s = DurableStream::with_client(&client, s.url().as_str()).unwrap();
    s.head().await.unwrap();
    proxy.fail_next(1);
    let e = s
        .append_with("twice?".into(), AppendOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(503));
    assert_eq!(
        s.stream(StreamOptions::new())
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "once"
    );
}

/// Static and dynamic headers are sent on every request, with the closure evaluated per request.
#[tokio::test]
async fn dynamic_headers_on_every_request() {
    let srv = Server::start(&args());
    let proxy = Proxy::start(srv.addr).await;
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let client = Client::builder()
        .header("x-static", "yes")
        .dynamic_header("authorization", move || {
            Some(format!(
                "Bearer token-{}",
                n2.fetch_add(1, Ordering::SeqCst)
            ))
        })
        .build()
        .unwrap();
    let s = DurableStream::with_client(&client, &proxy.url(&name("hdr"))).unwrap();
    s.create_stream(CreateOptions::new().json()).await.unwrap();
    s.append_json(&json!(1)).await.unwrap();
    let _ = s
        .stream(StreamOptions::new())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let p = s.producer("p", Default::default()).unwrap();
    p.append_json(&json!(2)).unwrap();
    p.flush().await.unwrap();
    let calls = n.load(Ordering::SeqCst);
    assert!(calls >= 4, "closure called per request ({calls})");
    let log = proxy.log_text();
    for i in 0..calls {
        assert!(
            log.contains(&format!("authorization: bearer token-{i}\r\n")),
            "token {i} missing"
        );
    }
    assert_eq!(log.matches("x-static: yes").count(), calls);
}

/// Dynamic query parameters are evaluated per request and added to every URL, reads included.
#[tokio::test]
async fn dynamic_params_on_every_request() {
    let srv = Server::start(&args());
    let proxy = Proxy::start(srv.addr).await;
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let client = Client::builder()
        .dynamic_param("request_id", move || {
            Some(format!("r{}", n2.fetch_add(1, Ordering::SeqCst)))
        })
        .build()
        .unwrap();
    let s = DurableStream::with_client(&client, &proxy.url(&name("param"))).unwrap();
    s.create_stream(CreateOptions::new().content_type("text/plain"))
        .await
        .unwrap();
    s.append_text("hi").await.unwrap();
    assert_eq!(
        s.stream(StreamOptions::new())
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "hi"
    );
    let calls = n.load(Ordering::SeqCst);
    assert_eq!(calls, 3, "one value per request");
    let log = proxy.log_text();
    assert!(
        log.contains("?request_id=r0 http/1.1"),
        "PUT carries the param: {log}"
    );
    assert!(
        log.contains("?request_id=r1 http/1.1"),
        "POST carries the param"
    );
    assert!(
        log.contains("offset=-1&request_id=r2 http/1.1"),
        "GET keeps its own query and adds the param"
    );
}

/// A handle told its content type appends without asking the server first.
#[tokio::test]
async fn known_content_type_skips_the_head() {
    let srv = Server::start(&args());
    let proxy = Proxy::start(srv.addr).await;
    let url = proxy.url(&name("ct"));
    DurableStream::create(&url, CreateOptions::new().json())
        .await
        .unwrap();
    let before = proxy.log_text().matches("head /").count();
    let s = DurableStream::new(&url)
        .unwrap()
        .with_content_type("application/json");
    s.append_text("[1,2]").await.unwrap();
    assert_eq!(
        proxy.log_text().matches("head /").count(),
        before,
        "no HEAD"
    );
    let items: Vec<Value> = s
        .stream(StreamOptions::new())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        items,
        vec![json!([1, 2])],
        "JSON handling follows the declared content type"
    );
}
