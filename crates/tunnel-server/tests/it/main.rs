#![allow(unreachable_pub)]

//! Integration tests: a real server on 127.0.0.1:0 with a real SQLite file, driven over HTTP.
//! Time-dependent behaviour is driven by a manual clock, never by sleeping.

mod common;

mod acp;
mod approvals;
mod auth;
mod browser;
mod cdp;
mod compat;
mod dashboard;
mod delivery;
mod hostile;
mod input;
mod lifecycle;
mod limits;
mod longpoll;
mod restart;
mod sessions;
mod streams;
