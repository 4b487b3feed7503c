"""The command-line entry points: ``base`` (what train.py and compress.py share: config
lookup, LightningCLI set-up), ``train`` and ``compress`` (their LightningCLI classes),
``setup`` (process-wide settings made once at start) and ``errors`` (bad input as one line)."""
