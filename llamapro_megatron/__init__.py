"""LLaMA Pro (arXiv 2401.02415) on megatron-core: conversion, block expansion, post-pretraining."""

__version__ = "0.1.0"
