"""What a run prints: Lightning's banners once, the project's warnings as one line each."""
from __future__ import annotations

import logging

import torch

import compression.pipeline
from cli.setup import LightningBanners, format_warning


def test_the_projects_warnings_are_one_line_and_other_libraries_keep_their_source():
    ours = format_warning(UserWarning("lambda=0.5 is above lambda_max"), UserWarning, compression.pipeline.__file__, 303,
                          "rank_zero_warn(...)")
    assert ours == "warning: lambda=0.5 is above lambda_max\n"
    theirs = format_warning(UserWarning("deprecated"), UserWarning, torch.__file__, 10, "x = 1")
    assert torch.__file__ in theirs and "UserWarning: deprecated" in theirs


def test_lightning_banners_pass_once_and_the_tip_never():
    banners = LightningBanners()

    def passes(message: str) -> bool:
        return banners.filter(logging.LogRecord("pl", logging.INFO, __file__, 1, message, None, None))

    assert passes("GPU available: False, used: False")
    assert not passes("GPU available: False, used: False")
    assert not passes("💡 Tip: For seamless cloud uploads and versioning, try installing litmodels")
    assert passes("compressing 1 group(s) of neurons:") and passes("compressing 1 group(s) of neurons:")
