"""OpenAI-compatible HTTP front end: `schemas` validates request bodies without
any I/O, `app` serves them over aiohttp on top of the engine."""
