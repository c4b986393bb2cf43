//! Event sourcing on Durable Streams: the seed's order example in Rust.
//!
//! Run a server (`cargo run -p durable-streams-server -- dev`), then
//! `cargo run -p event-sourcing-example [-- BASE_URL]` (default
//! `$STREAM_URL` or `http://127.0.0.1:4437/v1/stream`). Every step checks
//! its own result; the program exits non-zero if one is wrong and prints
//! `all checks passed` otherwise.
//!
//! Steps: append events; rebuild state by replay; live tail with a saved
//! checkpoint and resume from it; snapshot and restore from its offset; two
//! projections from one stream; exactly-once writes through the idempotent
//! producer when batches are retried.

use anyhow::{ensure, Context, Result};
use durable_streams_client::{
    Client, CreateOptions, DurableStream, FileOffsetStore, LiveMode, OffsetStore, ProducerOptions,
    StreamOptions,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
#[allow(clippy::enum_variant_names)] // the seed's event names
enum Event {
    OrderCreated {
        order_id: String,
        total: f64,
        timestamp: u64,
    },
    OrderPaid {
        order_id: String,
        payment_id: String,
        timestamp: u64,
    },
    OrderShipped {
        order_id: String,
        tracking_id: String,
        timestamp: u64,
    },
    OrderDelivered {
        order_id: String,
        timestamp: u64,
    },
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::OrderCreated { .. } => "OrderCreated",
            Event::OrderPaid { .. } => "OrderPaid",
            Event::OrderShipped { .. } => "OrderShipped",
            Event::OrderDelivered { .. } => "OrderDelivered",
        }
    }
    fn timestamp(&self) -> u64 {
        match self {
            Event::OrderCreated { timestamp, .. }
            | Event::OrderPaid { timestamp, .. }
            | Event::OrderShipped { timestamp, .. }
            | Event::OrderDelivered { timestamp, .. } => *timestamp,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
struct OrderState {
    status: String,
    total: f64,
    payment_id: Option<String>,
    tracking_id: Option<String>,
    delivered_at: Option<u64>,
}

fn initial_state() -> OrderState {
    OrderState {
        status: "created".into(),
        ..OrderState::default()
    }
}

/// The reducer: how each event transforms the state.
fn apply_event(mut s: OrderState, e: &Event) -> OrderState {
    match e {
        Event::OrderCreated { total, .. } => s.total = *total,
        Event::OrderPaid { payment_id, .. } => {
            s.status = "paid".into();
            s.payment_id = Some(payment_id.clone());
        }
        Event::OrderShipped { tracking_id, .. } => {
            s.status = "shipped".into();
            s.tracking_id = Some(tracking_id.clone());
        }
        Event::OrderDelivered { timestamp, .. } => {
            s.status = "delivered".into();
            s.delivered_at = Some(*timestamp);
        }
    }
    s
}

/// Projection 1: a summary for listings.
#[derive(Debug, Clone, PartialEq)]
struct OrderSummary {
    order_id: String,
    status: String,
    total: f64,
    created_at: u64,
}

fn project_summary(summary: Option<OrderSummary>, e: &Event) -> Option<OrderSummary> {
    match (summary, e) {
        (
            _,
            Event::OrderCreated {
                order_id,
                total,
                timestamp,
            },
        ) => Some(OrderSummary {
            order_id: order_id.clone(),
            status: "created".into(),
            total: *total,
            created_at: *timestamp,
        }),
        (Some(s), Event::OrderPaid { .. }) => Some(OrderSummary {
            status: "paid".into(),
            ..s
        }),
        (Some(s), Event::OrderShipped { .. }) => Some(OrderSummary {
            status: "shipped".into(),
            ..s
        }),
        (Some(s), Event::OrderDelivered { .. }) => Some(OrderSummary {
            status: "delivered".into(),
            ..s
        }),
        (None, _) => None,
    }
}

/// Projection 2: an audit trail.
fn project_audit(mut trail: Vec<String>, e: &Event) -> Vec<String> {
    trail.push(format!("{}@{}", e.name(), e.timestamp()));
    trail
}

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    offset: String,
    state: OrderState,
}

#[tokio::main]
async fn main() -> Result<()> {
    let base = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("STREAM_URL").ok())
        .unwrap_or_else(|| "http://127.0.0.1:4437/v1/stream".into());
    let order_id = format!("{}-{}", std::process::id(), chrono_like_now());
    let url = format!("{}/orders/{order_id}/events", base.trim_end_matches('/'));
    let client = Client::new();
    let work = std::env::temp_dir().join(format!("event-sourcing-{order_id}"));
    std::fs::create_dir_all(&work)?;

    // 1. Append events to the log.
    let log = DurableStream::create_with_client(&client, &url, CreateOptions::new().json()).await?;
    let created = Event::OrderCreated {
        order_id: order_id.clone(),
        total: 99.99,
        timestamp: 1,
    };
    let paid = Event::OrderPaid {
        order_id: order_id.clone(),
        payment_id: "pay_xyz".into(),
        timestamp: 2,
    };
    let shipped = Event::OrderShipped {
        order_id: order_id.clone(),
        tracking_id: "track_abc".into(),
        timestamp: 3,
    };
    log.append_json(&created).await?;
    log.append_json(&paid).await?;
    let after_paid = log.head().await?.next_offset;
    log.append_json(&shipped).await?;
    println!("1. appended 3 events to {url}");

    // 2. Replay from the beginning to rebuild state.
    let events: Vec<Event> = log
        .stream(StreamOptions::new().offset("-1"))
        .await?
        .json()
        .await?;
    let state = events.iter().fold(initial_state(), apply_event);
    ensure!(
        events == [created.clone(), paid.clone(), shipped.clone()],
        "replay returned {events:?}"
    );
    ensure!(
        state.status == "shipped" && state.total == 99.99,
        "state {state:?}"
    );
    ensure!(
        state.payment_id.as_deref() == Some("pay_xyz")
            && state.tracking_id.as_deref() == Some("track_abc"),
        "state {state:?}"
    );
    println!(
        "2. replayed {} events: status={} total={}",
        events.len(),
        state.status,
        state.total
    );

    // 3. Live tail with a checkpoint saved after every batch.
    let store = FileOffsetStore::new(work.join("checkpoints"))?;
    let mut live = log
        .stream(StreamOptions::new().offset("-1").live(LiveMode::Auto))
        .await?;
    let mut tail_state = initial_state();
    let delivered = Event::OrderDelivered {
        order_id: order_id.clone(),
        timestamp: 4,
    };
    let mut writer = None;
    while let Some(batch) = live.next_batch().await? {
        for e in batch.items::<Event>()? {
            tail_state = apply_event(tail_state, &e);
        }
        store.save("order-tail", &batch.offset).await?;
        if batch.up_to_date && writer.is_none() {
            // Caught up: another service delivers the order while we are tailing.
            let w = log.clone();
            let ev = delivered.clone();
            writer = Some(tokio::spawn(async move { w.append_json(&ev).await }));
        }
        if tail_state.status == "delivered" {
            break;
        }
    }
    if let Some(w) = writer {
        w.await??;
    }
    ensure!(
        tail_state.delivered_at == Some(4),
        "live tail state {tail_state:?}"
    );
    // A restarted consumer resumes from the checkpoint and sees only what came after it.
    let checkpoint = store
        .load("order-tail")
        .await?
        .context("checkpoint saved")?;
    let since: Vec<Event> = log
        .stream(StreamOptions::new().offset(checkpoint.as_str()))
        .await?
        .json()
        .await?;
    ensure!(
        since.is_empty(),
        "nothing new after the checkpoint, got {since:?}"
    );
    println!(
        "3. live tail reached status={} and checkpointed at {checkpoint}",
        tail_state.status
    );

    // 4. Snapshot at an offset, then restore = snapshot + events since.
    let upto: Vec<Event> = log.stream(StreamOptions::new()).await?.json().await?;
    let snap_state = upto.iter().take(2).fold(initial_state(), apply_event);
    let snapshot = Snapshot {
        offset: after_paid.clone(),
        state: snap_state,
    };
    let snap_path = work.join("snapshot.json");
    std::fs::write(&snap_path, serde_json::to_vec(&snapshot)?)?;
    let loaded: Snapshot = serde_json::from_slice(&std::fs::read(&snap_path)?)?;
    let recent: Vec<Event> = log
        .stream(StreamOptions::new().offset(loaded.offset.as_str()))
        .await?
        .json()
        .await?;
    let restored = recent.iter().fold(loaded.state, apply_event);
    let full: Vec<Event> = log.stream(StreamOptions::new()).await?.json().await?;
    let full_state = full.iter().fold(initial_state(), apply_event);
    ensure!(
        recent.len() == 2,
        "snapshot replay read {} events",
        recent.len()
    );
    ensure!(
        restored == full_state,
        "restored {restored:?} != full {full_state:?}"
    );
    println!(
        "4. restored from snapshot at {} + {} events: status={}",
        loaded.offset,
        recent.len(),
        restored.status
    );

    // 5. Two projections from one stream.
    let mut summary = None;
    let mut audit = Vec::new();
    for e in &full {
        summary = project_summary(summary, e);
        audit = project_audit(audit, e);
    }
    let summary = summary.context("summary exists")?;
    ensure!(
        summary.status == "delivered" && summary.total == 99.99 && summary.created_at == 1,
        "{summary:?}"
    );
    ensure!(
        audit
            == [
                "OrderCreated@1",
                "OrderPaid@2",
                "OrderShipped@3",
                "OrderDelivered@4"
            ],
        "{audit:?}"
    );
    println!(
        "5. projections: summary {} {} {}, audit trail of {}",
        summary.order_id,
        summary.status,
        summary.total,
        audit.len()
    );

    // 6. Exactly-once writes: a producer process sends two events, then
    //    "crashes" before recording the acknowledgements; its replacement
    //    (same producer id and epoch) re-sends its outbox. The server
    //    recognises the retried batches and stores nothing twice.
    let audit_url = format!("{}/orders/{order_id}/audit", base.trim_end_matches('/'));
    let audit_log =
        DurableStream::create_with_client(&client, &audit_url, CreateOptions::new().json()).await?;
    let outbox: Vec<Vec<u8>> = ["OrderCreated", "OrderPaid"]
        .iter()
        .map(|t| serde_json::to_vec(&serde_json::json!({ "type": t })))
        .collect::<Result<_, _>>()?;
    let first = audit_log.producer("order-service-1", ProducerOptions::default())?;
    for ev in &outbox {
        first.send(ev.clone()).await?; // one batch each: sequence numbers 0 and 1
    }
    drop(first);
    let second = audit_log.producer("order-service-1", ProducerOptions::default())?;
    let mut duplicates = 0;
    for ev in &outbox {
        if second.send(ev.clone()).await?.duplicate {
            duplicates += 1;
        }
    }
    second
        .send(serde_json::to_vec(
            &serde_json::json!({ "type": "OrderShipped" }),
        )?)
        .await?;
    second.close(None).await?;
    let stored: Vec<serde_json::Value> =
        audit_log.stream(StreamOptions::new()).await?.json().await?;
    ensure!(
        duplicates == 2,
        "both retried batches were deduplicated, got {duplicates}"
    );
    let types: Vec<&str> = stored.iter().filter_map(|v| v["type"].as_str()).collect();
    ensure!(
        types == ["OrderCreated", "OrderPaid", "OrderShipped"],
        "stored {types:?}"
    );
    println!(
        "6. exactly-once: {} retried batches deduplicated, {} events stored",
        duplicates,
        stored.len()
    );

    log.delete().await?;
    audit_log.delete().await?;
    let _ = std::fs::remove_dir_all(&work);
    println!("all checks passed");
    Ok(())
}

fn chrono_like_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}
