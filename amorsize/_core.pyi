"""Type stubs for the compiled core ``amorsize._core``."""

# --- retry ---------------------------------------------------------------------------------
def backoff_delay(
    initial_delay: float, exponential_base: float, max_delay: float, attempt: int
) -> float: ...

# --- model ---------------------------------------------------------------------------------

# --- circuit -------------------------------------------------------------------------------
