"""The studies: ``spec`` reads ``conf/study/<name>.yaml``; ``arms`` groups a sweep into arms x seeds; each
other module judges one kind of study (brake/trend, metric, seed direction, read-time interventions)."""
