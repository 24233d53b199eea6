# SPDX-License-Identifier: Apache-2.0
"""meter's BPF C sources, shipped as package data (``meter.bpf``).

This file only makes the directory a package so ``importlib.resources``
finds the ``*.bpf.c`` and ``*.h`` files in an installed meter.
"""
