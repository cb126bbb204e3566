"""The report's analysis: runs grouped into Table 2, the paired significance statistics, the
Markdown / CSV / LaTeX renderers and the charts. Needs neither torch nor the data pipeline."""
