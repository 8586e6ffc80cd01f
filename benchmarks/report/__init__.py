"""``make bench-report``: the published CPU benchmark, docs/benchmarks.md and its plots, from one
run on one machine.

    make bench-report                          # the full run (~30 min on 2 cores)
    python -m benchmarks.report --quick        # the whole pipeline in a few minutes
    python -m benchmarks.report --render-only  # the page and plots again from the JSON

Modules, one job each:
  plan         what a run measures (full or quick)
  schema       the results JSON that one run writes and the page is rendered from
  environment  the machine, the date and the versions the page states
  infinity     Infinity 0.0.78 in its own venv, as a server to measure
  systems      the servers under test, started and stopped together
  models       raw ``encode`` and the backends in a process of their own
  measure      the sweeps over those servers: concurrency, offered load, Zipf skew
  knee         where latency turns up, by the rule the page states
  plots        the PNGs (matplotlib, Agg)
  page         the generated part of docs/benchmarks.md, between its markers
  run          one run: every section in order, into the JSON
"""
