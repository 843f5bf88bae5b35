"""Locust load tests for the Riffusion service, a headless runner and its reports.

- ``load_tests/locustfile.py``: the traffic model (web-app listeners, API clients, load shapes);
- ``python -m load_tests.run``: starts a local server unless given a host, runs locust
  headless, writes CSV/HTML/PNG/markdown into one folder and gates on thresholds;
- ``load_tests.report``: turns locust's CSV files and ``/metrics`` scrapes into the summary.
- ``load_tests.server``: ``LocalServer``, a throwaway local ``bentoml serve`` (no locust import).
"""
