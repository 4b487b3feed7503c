"""Callbacks: cross-cutting behaviour (convergence, figures, reports)."""
