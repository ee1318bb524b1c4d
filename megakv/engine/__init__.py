"""The serving engine: requests, scheduler, model runner, sampling."""
