//! Placeholder: the scheduler core.
