//! The runner against a real server on 127.0.0.1:0, running real child processes: scripted
//! agents written by each test, and the fake CLIs in tests/fixtures.

#![allow(unreachable_pub)]

mod harness;

mod acp;
mod agents;
mod bad_input;
mod clis;
mod containment;
mod files;
mod reconnect;
mod supervision;
