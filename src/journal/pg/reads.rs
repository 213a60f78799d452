//! Fleet reads: status, report, balance, usage and consumption from the shared journal.
