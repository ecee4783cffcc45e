"""A vLLM engine simulator for the lab: the engine model, its HTTP server, faults and CLI.

``model`` is the pure engine (scheduler, paged KV cache, prefix caching, step timing),
``server`` its aiohttp edge with vLLM's API and metrics, ``faults`` the fault switches,
``cli`` the ``kvroute engine-sim`` command.
"""
