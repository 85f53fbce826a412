//! The WASI interfaces a plugin may import: what Rust's `std` needs (stdio,
//! environment, exit, `wasi:io`), clocks and random numbers. Filesystem and
//! sockets are not linked at all, so a component that imports them fails to
//! load, naming the import (see [`ungranted_import`]), rather than finding
//! a denied call at its first event. (`wasmtime_wasi::p2::add_to_linker_async`
//! would link them, relying on the context to deny every call.)

use wasmtime::component::{HasData, Linker, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::cli::{WasiCli, WasiCliView};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
use wasmtime_wasi::p2::bindings::{cli, clocks, io, random};
use wasmtime_wasi::random::WasiRandom;

/// `wasi:io` works on the store's resource table.
struct IoTable;

impl HasData for IoTable {
    type Data<'a> = &'a mut ResourceTable;
}

/// Adds the granted WASI 0.2 interfaces (async flavour) to `linker`.
pub fn add_granted<T: WasiView>(l: &mut Linker<T>) -> wasmtime::Result<()> {
    io::error::add_to_linker::<T, IoTable>(l, |t| t.ctx().table)?;
    io::poll::add_to_linker::<T, IoTable>(l, |t| t.ctx().table)?;
    io::streams::add_to_linker::<T, IoTable>(l, |t| t.ctx().table)?;
    clocks::wall_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    clocks::monotonic_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    random::random::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    random::insecure::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    random::insecure_seed::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    cli::exit::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::environment::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_input::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_output::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    Ok(())
}

/// The import a failed `instantiate_pre` could not satisfy, e.g.
/// `wasi:sockets/tcp@0.2.6`, when that is why it failed. Wasmtime words it
/// "component imports instance `NAME`, but a matching implementation was not
/// found in the linker" (with the detail below it in the error chain).
pub fn ungranted_import(e: &wasmtime::Error) -> Option<String> {
    let text = e.to_string();
    let rest = text.strip_prefix("component imports ")?;
    // The innermost cause tells a missing definition ("function
    // implementation is missing") from one of the wrong type.
    if !e
        .root_cause()
        .to_string()
        .ends_with("implementation is missing")
    {
        return None;
    }
    let name = rest.split('`').nth(1)?;
    Some(name.to_string())
}
