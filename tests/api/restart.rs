//! Crash and restart: the real binary, killed with SIGKILL while messages are queued and in
//! flight, then started again on the same database. Every message reaches Twilio once.

use secrecy::ExposeSecret;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;
use switchboard::simulator::SimulatorSettings;
use tokio::process::{Child, Command};

use crate::helpers::*;

const KEY: &str = "sb_restart_test_key_0123456789";

struct Gateway {
    child: Child,
    base: String,
}

async fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn spawn_gateway(
    port: u16,
    db: &std::path::Path,
    sim: &switchboard::simulator::Simulator,
    sim_base: &str,
    log: &std::path::Path,
) -> Gateway {
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_DATABASE_URL", format!("sqlite://{}", db.display()))
        .env("SWITCHBOARD_API_KEY", KEY)
        .env("TWILIO_ACCOUNT_SID", sim.account_sid())
        .env("TWILIO_AUTH_TOKEN", sim.auth_token().expose_secret())
        .env("TWILIO_API_BASE", sim_base)
        .env("TWILIO_PHONE_NUMBER", SENDER)
        .env("TWILIO_REQUEST_TIMEOUT_SECS", "20")
        .env("SWITCHBOARD_DELIVERY__DEFAULT_RATE", "10")
        .env("SWITCHBOARD_DELIVERY__POLL_INTERVAL_MS", "50")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .expect("start the switchboard binary");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let up = wait_for_health(&client, &base).await;
    assert!(
        up,
        "gateway did not start; log: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    Gateway { child, base }
}

#[tokio::test]
async fn a_restart_with_queued_and_in_flight_messages_sends_each_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("switchboard.db");
    let log = dir.path().join("gateway.log");
    let port = free_port().await;
    // Twilio records each create, then answers only after 2 s: a kill in that window leaves
    // messages that reached Twilio without the gateway learning their SIDs.
    let (sim, sim_base, _sim_stop) = start_simulator(
        SimulatorSettings {
            latency_ms: 2000,
            callback_delay_ms: 20,
            ..Default::default()
        },
        format!("127.0.0.1:{port}").parse().unwrap(),
    )
    .await;
    let mut gw = spawn_gateway(port, &db, &sim, &sim_base, &log).await;
    let client = reqwest::Client::new();

    let mut ids = Vec::new();
    for i in 0..30 {
        let r = client
            .post(format!("{}/api/v1/messages", gw.base))
            .bearer_auth(KEY)
            .json(&json!({"to": "+14155550100", "body": format!("restart test {i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // At 10 segments/s, a few are in flight (recorded by Twilio, answer pending) and the rest
    // still queued when the process dies.
    assert!(wait_until(Duration::from_secs(10), || async { sim.sent_messages().len() >= 5 }).await);
    gw.child.kill().await.unwrap();
    let in_flight = sim.sent_messages().len();
    assert!(
        in_flight < ids.len(),
        "everything was sent before the kill; the test proves nothing"
    );

    // Twilio answers promptly from now on.
    client
        .put(format!("{sim_base}/simulator/config"))
        .json(&json!({"latency_ms": 0, "callback_delay_ms": 20}))
        .send()
        .await
        .unwrap();
    let gw = spawn_gateway(port, &db, &sim, &sim_base, &log).await;

    let all_accepted = wait_until(Duration::from_secs(60), || async {
        let mut done = 0;
        for id in &ids {
            let v: Value = client
                .get(format!("{}/api/v1/messages/{id}", gw.base))
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["provider_sid"].is_string() {
                done += 1;
            }
        }
        done == ids.len()
    })
    .await;
    assert!(
        all_accepted,
        "not every message was handed to Twilio; log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let mut per_body: HashMap<String, usize> = HashMap::new();
    for m in sim.sent_messages() {
        *per_body.entry(m.body).or_default() += 1;
    }
    for i in 0..ids.len() {
        assert_eq!(
            per_body.get(&format!("restart test {i}")),
            Some(&1),
            "message {i} reached Twilio {:?} times",
            per_body.get(&format!("restart test {i}"))
        );
    }
    assert_eq!(sim.sent_messages().len(), ids.len());
    // The messages in flight at the kill were adopted by reconciliation, not resent.
    let mut reconciled = 0;
    let mut sids = std::collections::HashSet::new();
    for id in &ids {
        let v: Value = client
            .get(format!("{}/api/v1/messages/{id}", gw.base))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            sids.insert(v["provider_sid"].as_str().unwrap().to_string()),
            "two messages share a SID"
        );
        if v["status_history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["source"] == "reconcile")
        {
            reconciled += 1;
        }
    }
    assert!(
        reconciled >= 1,
        "expected at least one in-flight message to be reconciled (in flight at kill: {in_flight})"
    );
}
