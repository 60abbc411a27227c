//! tunnel-delivery against stand-ins for Discord, Telegram and a webhook receiver.

mod config;
mod discord;
mod render;
mod split;
mod standin;
mod telegram;
mod webhook;
