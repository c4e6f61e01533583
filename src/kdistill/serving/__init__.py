"""vLLM servers kdistill starts and stops, and the HTTP calls every client of them makes."""
