"""medlake.ui: the Streamlit catalog and review app (``medlake ui``)."""
