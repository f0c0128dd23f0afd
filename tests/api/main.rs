//! Black-box tests: the real gateway on port 0, a temp SQLite database each, the Twilio
//! simulator over real HTTP.

mod helpers;
#[path = "../support/postgres.rs"]
mod postgres;
#[path = "../support/sse.rs"]
mod sse;

mod bad_input;
mod compat;
mod delivery;
mod enrichment;
mod events;
mod inbox;
mod media;
mod messages;
mod ops;
mod restart;
mod search;
mod webhook_endpoints;
mod webhooks;
mod whatsapp;
