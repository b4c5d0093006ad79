"""Routing analytics: metrics (pure numpy functions), traces, analyses, reports and run comparison."""

from moelab.analysis.analyses import RunAnalysis, analyze_run, analyze_trace, compare_traces
from moelab.analysis.compare import compare_runs, write_comparison
from moelab.analysis.report import write_report
from moelab.analysis.trace import Trace, LayerTrace, config_hash, list_checkpoints, trace_model, trace_run

__all__ = [
    "RunAnalysis", "analyze_run", "analyze_trace", "compare_traces", "compare_runs", "write_comparison",
    "write_report", "Trace", "LayerTrace", "config_hash", "list_checkpoints", "trace_model", "trace_run",
]
