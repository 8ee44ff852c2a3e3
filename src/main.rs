//! The `mesh` binary: wiring only. Everything a test can reach lives in the library.

use std::process::ExitCode;

use mesh_supervisor::shim;

/// mimalloc instead of glibc's malloc: the data path allocates and frees many small
/// objects per request (header maps, h2 frames, boxed futures), and glibc spent ~6 % of
/// the mesh's CPU in `malloc`/`free`/`malloc_consolidate` in the benchmark profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let _argv0 = args.next();
    let mut rest = args.peekable();
    // `mesh __shim …` is the per-process shim (see mesh_supervisor::shim); it must run
    // before anything else touches the process: no runtime, no logging.
    if rest.peek().is_some_and(|a| a == shim::SHIM_ARG) {
        rest.next();
        let code = shim::main(rest.collect());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    mesh::cli::main()
}
