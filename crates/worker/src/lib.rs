//! Placeholder: the worker pipeline.
