//! `warden-agent`: PID 1 of the Warden ramdisk, or a host process for tests.
//!
//! Thin on purpose: pick the mode, set up the console and the runtime, hand
//! over to `workflow::boot`. As PID 1 this must never return (the kernel
//! panics when init exits); every error path ends in `init::power`.

use std::process::ExitCode;

use clap::Parser;
use warden_agent::config::{Config, HostArgs, PowerAction};
use warden_agent::{client, console, init, workflow};
use warden_protocol::console::Event;

fn main() -> ExitCode {
    let is_init = nix::unistd::getpid().as_raw() == 1;
    init::install_panic_hook();
    let cfg = if is_init {
        init::set_panic_action(Some(PowerAction::Halt));
        Config::init_defaults()
    } else {
        let args = match HostArgs::try_parse() {
            Ok(args) => args,
            // --help and --version are not errors; bad flags are (exit 1, like any fatal).
            Err(e) => {
                let _ = e.print();
                return if e.use_stderr() {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                };
            }
        };
        match args.into_config() {
            Ok(cfg) => cfg,
            Err(e) => {
                eprintln!("warden-agent: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let log = console::init(&cfg.log);
    client::install_crypto_provider();
    // One thread: the agent mostly waits, and RAM is the node's whole disk.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            let (action, code) = if is_init {
                ("halt", None)
            } else {
                ("exit", Some(ExitCode::FAILURE))
            };
            console::emit(&Event::Fatal {
                error: format!("cannot start the async runtime: {e}"),
                action: action.into(),
            });
            return code.unwrap_or_else(|| init::power(PowerAction::Halt));
        }
    };
    runtime.block_on(workflow::boot(cfg, Some(log)))
}
