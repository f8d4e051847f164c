//! Remote execution: the scheduler's I/O driver, the Execution and Operations services, and
//! the worker API service.

pub mod driver;
pub mod historical;
pub mod operations;
pub mod pipeline;
pub mod remote;
mod run_to_end;
pub mod service;
pub mod shared;
pub mod worker_api;

pub use driver::{ActionPayload, OpUpdate, SchedulerHandle, SchedulerStats};
pub use pipeline::{Backend, ExecutionPipeline};
