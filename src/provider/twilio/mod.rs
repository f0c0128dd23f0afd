//! Twilio: the REST client, webhook signatures and the error-code catalogue.

pub mod client;
pub mod error_codes;
pub mod signature;

pub use client::{TwilioClient, TwilioCredentials};
