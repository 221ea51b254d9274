//! The base every other module stands on: the one error type, the seedable RNG, plain
//! configuration data, the MPI process group, and process-level helpers (atomic writes,
//! devices, threads, memory). It imports nothing of the crate outside this folder.

pub mod alloc;
pub mod config;
pub mod dist;
pub mod error;
pub mod rng;
pub mod util;
