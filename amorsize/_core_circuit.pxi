# Circuit breaker state check on the call path: filled in by the reliability layer.
