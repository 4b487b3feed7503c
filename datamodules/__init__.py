"""LightningDataModules: each holds one data set with the paper's transforms."""
