//! **A consumer that attacks its host**, for testing that one misbehaving
//! plugin fails only its own delivery. The event's `type` picks the attack:
//!
//! | type | behaviour | what the host does |
//! | --- | --- | --- |
//! | `loop`, `fuel` | spins forever | deadline (`timeout`) or, with `fuel` set, fuel |
//! | `alloc` | grows its memory without bound | memory limit (`memory`) |
//! | `recurse` | recurses without bound | wasm stack overflow |
//! | `panic` | panics | trap; the panic message is kept |
//! | `trap` | executes `unreachable` | trap |
//! | `log-flood` | logs lines of 4 KiB, 16 MiB in all, then succeeds | caps and drops log output |
//! | `print-flood` | prints 16 MiB to stdout, then succeeds | caps the captured stdout |
//! | `kv-flood` | writes distinct keys until a kv call fails, then returns that error | the plugin's `kv_quota`, or what one delivery may store |
//! | `kv-large` | writes one value of `value_bytes` under `large`, then succeeds | what the engine can store in one message |
//! | `emit-storm` | emits events until an emit fails, then returns that error | emits per delivery; the delivery is dead-lettered |
//! | `emit-flood` | emits events of 512 KiB until an emit fails, then returns that error | what one delivery may store; the delivery is dead-lettered |
//! | `reject-flood` | rejects with a reason of 4 MiB | keeps the reason's first 256 bytes; the delivery is dead-lettered |
//! | anything else | succeeds | |
//!
//! `kv-flood` and `kv-large` write values of `{"value_bytes": N}` bytes
//! (default 64 KiB).

use std::hint::black_box;

use serde::Deserialize;
use switchyard_sdk::{Event, Failure, Plugin, emit, kv, log};

/// One attack, picked by the event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Loop,
    Alloc,
    Recurse,
    Panic,
    Trap,
    LogFlood,
    PrintFlood,
    KvFlood,
    KvLarge,
    EmitStorm,
    EmitFlood,
    RejectFlood,
    Harmless,
}

impl Mode {
    fn of(ty: &str) -> Mode {
        match ty {
            // `fuel` is the same attack, for a route to a plugin with `fuel`.
            "loop" | "fuel" => Mode::Loop,
            "alloc" => Mode::Alloc,
            "recurse" => Mode::Recurse,
            "panic" => Mode::Panic,
            "trap" => Mode::Trap,
            "log-flood" => Mode::LogFlood,
            "print-flood" => Mode::PrintFlood,
            // `kv-flood-large` is the same attack, for a route to a plugin
            // whose quota is larger than what one delivery may store.
            "kv-flood" | "kv-flood-large" => Mode::KvFlood,
            "kv-large" => Mode::KvLarge,
            "emit-storm" => Mode::EmitStorm,
            "emit-flood" => Mode::EmitFlood,
            "reject-flood" => Mode::RejectFlood,
            _ => Mode::Harmless,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Options {
    value_bytes: Option<usize>,
}

/// Total output of the flood modes.
const FLOOD_BYTES: usize = 16 << 20;
/// One log line or print of the flood modes.
const FLOOD_LINE: usize = 4 << 10;
const DEFAULT_VALUE_BYTES: usize = 64 << 10;
/// The data of each event `emit-flood` emits (a JSON string).
const FLOOD_EMIT: usize = 512 << 10;
/// The reason `reject-flood` gives, bytes after its prefix (a few times
/// over NATS's whole message, well within the plugin's memory).
const REJECT_FLOOD: usize = 4 << 20;

struct Hostile;

impl Plugin for Hostile {
    fn handle(event: Event) -> Result<(), Failure> {
        match Mode::of(&event.ty) {
            Mode::Loop => spin(),
            Mode::Alloc => hoard(),
            Mode::Recurse => {
                black_box(recurse(0));
            }
            Mode::Panic => panic!("hostile: panic on purpose"),
            Mode::Trap => trap(),
            Mode::LogFlood => {
                let line = "x".repeat(FLOOD_LINE);
                for _ in 0..FLOOD_BYTES / FLOOD_LINE {
                    log::info(&line);
                }
            }
            Mode::PrintFlood => {
                let line = "y".repeat(FLOOD_LINE - 1);
                for _ in 0..FLOOD_BYTES / FLOOD_LINE {
                    println!("{line}");
                }
            }
            Mode::KvFlood => {
                let options: Options = event.data_as().unwrap_or_default();
                let value = vec![b'v'; options.value_bytes.unwrap_or(DEFAULT_VALUE_BYTES)];
                for i in 0u64.. {
                    // Fails once the host's limit is reached; `?` hands the
                    // host's error back as the delivery's failure.
                    kv::set(&format!("flood/{i}"), &value)?;
                }
            }
            Mode::KvLarge => {
                let options: Options = event.data_as().unwrap_or_default();
                kv::set(
                    "large",
                    &vec![b'v'; options.value_bytes.unwrap_or(DEFAULT_VALUE_BYTES)],
                )?;
            }
            Mode::EmitStorm => {
                for i in 0u64.. {
                    emit::json("storm", &i)?;
                }
            }
            Mode::EmitFlood => {
                let data = "e".repeat(FLOOD_EMIT);
                loop {
                    emit::json("flood", &data)?;
                }
            }
            Mode::RejectFlood => {
                let mut reason = String::from("hostile: ");
                reason.push_str(&"r".repeat(REJECT_FLOOD));
                return Err(Failure::reject(reason));
            }
            Mode::Harmless => {}
        }
        Ok(())
    }
}

switchyard_sdk::export!(Hostile);

/// Burns CPU forever (`black_box` keeps the optimizer from removing it).
fn spin() -> ! {
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Keeps 1 MiB blocks, each written to so it is really used, forever.
fn hoard() -> ! {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        let block = vec![black_box(1u8); 1 << 20];
        kept.push(black_box(block));
    }
}

/// Recursion that is not a tail call, so each level takes a wasm stack frame.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    recurse(depth + 1).wrapping_add(black_box(depth))
}

#[cfg(target_arch = "wasm32")]
fn trap() -> ! {
    core::arch::wasm32::unreachable()
}

#[cfg(not(target_arch = "wasm32"))]
fn trap() -> ! {
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_type_picks_the_mode() {
        assert_eq!(Mode::of("loop"), Mode::Loop);
        assert_eq!(Mode::of("fuel"), Mode::Loop);
        assert_eq!(Mode::of("kv-flood"), Mode::KvFlood);
        assert_eq!(Mode::of("emit-storm"), Mode::EmitStorm);
        assert_eq!(Mode::of("log-flood"), Mode::LogFlood);
        assert_eq!(Mode::of("reject-flood"), Mode::RejectFlood);
        assert_eq!(Mode::of("order.created"), Mode::Harmless);
    }
}
