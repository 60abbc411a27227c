//! Request bodies of the API as the server reads them: serde_json into the tunnel-protocol
//! type, then its `validate`. Properties: never panics; a body that is accepted survives a
//! round trip (serialize, parse again: the same value, still valid), so what the server
//! stores and hands on is what it checked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use tunnel_protocol::{
    AppendEvents, ApprovalAnswer, ApprovalRequest, ApprovalWait, AttemptRef, ClaimRequest,
    CreateToken, FinishRequest, Heartbeat, ReportSessions, SessionCommand, SubmitTask,
};

fn check<T>(body: &[u8], validate: impl Fn(&T) -> bool)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let Ok(value) = serde_json::from_slice::<T>(body) else {
        return;
    };
    if !validate(&value) {
        return;
    }
    let text = serde_json::to_vec(&value).expect("an accepted body serializes");
    let again: T = serde_json::from_slice(&text).expect("an accepted body parses again");
    assert_eq!(again, value, "round trip changed an accepted body");
    assert!(
        validate(&again),
        "an accepted body is invalid after a round trip"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 12 {
        0 => check::<SubmitTask>(body, |v| v.validate().is_ok()),
        1 => check::<ClaimRequest>(body, |v| v.validate().is_ok()),
        2 => check::<FinishRequest>(body, |v| v.validate().is_ok()),
        3 => check::<AppendEvents>(body, |v| v.validate().is_ok()),
        4 => check::<Heartbeat>(body, |_| true),
        5 => check::<AttemptRef>(body, |_| true),
        6 => check::<SessionCommand>(body, |v| v.validate(true).is_ok()),
        7 => check::<CreateToken>(body, |v| v.validate().is_ok()),
        8 => check::<ApprovalRequest>(body, |v| v.validate().is_ok()),
        9 => check::<ApprovalAnswer>(body, |v| v.validate().is_ok()),
        10 => check::<ApprovalWait>(body, |_| true),
        _ => check::<ReportSessions>(body, |v| v.validate().is_ok()),
    }
});
