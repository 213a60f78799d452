//! The local Azure Marketplace emulator (see issue 3).
