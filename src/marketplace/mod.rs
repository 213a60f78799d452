//! Azure Marketplace wire types, token providers, client and outcome classification.
