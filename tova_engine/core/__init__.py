"""The engine core: the scheduler (with its prefill pacing and prefix cache), the requests it
runs, the step loop, its own process and the typed messages it exchanges with the front end.
It sees one executor."""
