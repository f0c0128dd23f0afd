//! Switchboard: a self-hosted two-way SMS, MMS and WhatsApp gateway over Twilio.
//!
//! The layers, each a module: `api` (REST v1) and `webhooks` (Twilio in) are thin HTTP
//! handlers over `service`; `service` applies the product's rules over `store` (storage
//! behind one trait) and wakes `delivery` (the workers that hand queued messages to
//! `provider`, i.e. Twilio) and `media` (the workers that fetch inbound media files);
//! `simulator` is a Twilio stand-in for development and tests.
//! `events` is the stream of every visible change; `hooks` pushes it to subscribers' URLs
//! (outbound event webhooks) and `enrichment` asks a lookup service about new numbers, both
//! through `outbound`, the guarded HTTP client for calls made on someone else's behalf.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod enrichment;
pub mod error;
pub mod events;
pub mod hooks;
pub mod media;
pub mod outbound;
pub mod provider;
pub mod service;
pub mod simulator;
pub mod store;
pub mod telemetry;
pub mod util;
pub mod web;
pub mod webhooks;

pub use app::{start, Server};
pub use config::Config;
