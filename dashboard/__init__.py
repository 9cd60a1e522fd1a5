"""The equishift Streamlit dashboard: layout only; every number and figure comes from ``equishift``."""
