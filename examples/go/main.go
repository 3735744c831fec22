// Command consume-facility-status prints facility transitions from presence's
// `facility-status` topic as they arrive: a downstream Go service's starting point.
//
// franz-go reads the topic with read_committed isolation (the processor writes in
// transactions); hamba/avro decodes each value, which is Avro single-object encoding: C3 01,
// the writer schema's CRC-64-AVRO fingerprint (8 bytes, little-endian), then the binary
// body. Only presence's .avsc files are needed: every released version under
// schemas/history/ is resolved to the current schema. Each transition is printed as one JSON
// line, e.g.
//
//	{"facility_id":"clinic-42","region_id":"north","status":"ONLINE","open_sessions":1,"since":1764300000000,"seq":7,"emitted_at":1764300000120}
//
// The latest record per facility is its current status (the topic is compacted); seq rises
// by one per transition of a facility, so a consumer that stores it can drop repeats.
//
//	go run . -bootstrap-servers 127.0.0.1:9092 -from-beginning
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/hamba/avro/v2"
	"github.com/twmb/franz-go/pkg/kgo"
)

// FacilityStatus is schemas/facility_status.avsc.
type FacilityStatus struct {
	FacilityID   string    `avro:"facility_id"`
	RegionID     string    `avro:"region_id"`
	Status       string    `avro:"status"`
	OpenSessions int32     `avro:"open_sessions"`
	Since        time.Time `avro:"since"`
	Seq          int64     `avro:"seq"`
	EmittedAt    time.Time `avro:"emitted_at"`
}

var marker = []byte{0xC3, 0x01}

// decoder knows the current schema and every released one, by fingerprint.
type decoder struct {
	reader  avro.Schema
	writers map[uint64]avro.Schema
}

func loadSchemas(dir string) (*decoder, error) {
	parse := func(path string) (avro.Schema, uint64, error) {
		text, err := os.ReadFile(path)
		if err != nil {
			return nil, 0, err
		}
		// A cache of its own per file: every version names the same record.
		s, err := avro.ParseBytesWithCache(text, "", &avro.SchemaCache{})
		if err != nil {
			return nil, 0, fmt.Errorf("%s: %w", path, err)
		}
		return s, crc64Avro([]byte(canonical(s))), nil
	}
	reader, fp, err := parse(filepath.Join(dir, "facility_status.avsc"))
	if err != nil {
		return nil, err
	}
	d := &decoder{reader: reader, writers: map[uint64]avro.Schema{fp: reader}}
	older, _ := filepath.Glob(filepath.Join(dir, "history", "facility_status", "*.avsc"))
	for _, path := range older {
		s, fp, err := parse(path)
		if err != nil {
			return nil, err
		}
		if _, ok := d.writers[fp]; !ok {
			resolved, err := avro.NewSchemaCompatibility().Resolve(reader, s)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", path, err)
			}
			d.writers[fp] = resolved
		}
	}
	return d, nil
}

func (d *decoder) decode(value []byte) (FacilityStatus, error) {
	var out FacilityStatus
	if len(value) < 10 || !bytes.Equal(value[:2], marker) {
		return out, errors.New("not Avro single-object encoding (no C3 01 marker)")
	}
	fp := binary.LittleEndian.Uint64(value[2:10])
	writer, ok := d.writers[fp]
	if !ok {
		return out, fmt.Errorf("unknown schema fingerprint %016x: update schemas/ from presence", fp)
	}
	return out, avro.Unmarshal(writer, value[10:], &out)
}

// withLogicalType is a primitive with a logical type in hamba/avro's Schema.String().
var withLogicalType = regexp.MustCompile(`\{"type":"(int|long|bytes|string)","logicalType":"[^"]*"\}`)

// canonical is the specification's Parsing Canonical Form. hamba/avro's Schema.String() is
// that form except that it keeps logical types, which the specification strips
// ({"type":"long","logicalType":"timestamp-millis"} is "long"); fingerprints computed on it
// would match no other implementation.
func canonical(s avro.Schema) string {
	return withLogicalType.ReplaceAllString(s.String(), `"$1"`)
}

// crc64Avro is the Avro specification's CRC-64-AVRO (Rabin) fingerprint of a schema's
// Parsing Canonical Form.
func crc64Avro(data []byte) uint64 {
	const empty = 0xc15d213aa4d7a795
	var table [256]uint64
	for i := range table {
		fp := uint64(i)
		for j := 0; j < 8; j++ {
			fp = (fp >> 1) ^ (empty & -(fp & 1))
		}
		table[i] = fp
	}
	fp := uint64(empty)
	for _, b := range data {
		fp = (fp >> 8) ^ table[byte(fp)^b]
	}
	return fp
}

func main() {
	brokers := flag.String("bootstrap-servers", envOr("KAFKA_BROKERS", "127.0.0.1:9092"), "Kafka brokers, comma-separated")
	topic := flag.String("topic", "facility-status", "the transitions topic")
	group := flag.String("group-id", "", "consumer group (default: none, every partition from the chosen end)")
	fromBeginning := flag.Bool("from-beginning", false, "read the topic from its start")
	schemas := flag.String("schemas", filepath.Join("..", "..", "schemas"), "presence's schemas/ directory")
	maxRecords := flag.Int("max-records", 0, "stop after this many transitions (0: never)")
	timeout := flag.Duration("timeout", 0, "stop after this long (0: never)")
	flag.Parse()

	dec, err := loadSchemas(*schemas)
	if err != nil {
		fmt.Fprintf(os.Stderr, "schemas: %v\n", err)
		os.Exit(2)
	}
	start := kgo.NewOffset().AtEnd()
	if *fromBeginning {
		start = kgo.NewOffset().AtStart()
	}
	opts := []kgo.Opt{
		kgo.SeedBrokers(strings.Split(*brokers, ",")...),
		kgo.ConsumeTopics(*topic),
		kgo.ConsumeResetOffset(start),
		// Only transitions the processor committed.
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
	}
	if *group != "" {
		opts = append(opts, kgo.ConsumerGroup(*group))
	}
	client, err := kgo.NewClient(opts...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kafka: %v\n", err)
		os.Exit(2)
	}
	defer client.Close()

	ctx := context.Background()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	out := json.NewEncoder(os.Stdout)
	printed := 0
	for *maxRecords == 0 || printed < *maxRecords {
		fetches := client.PollFetches(ctx)
		if ctx.Err() != nil {
			fmt.Fprintf(os.Stderr, "stopping: %v passed\n", *timeout)
			if *maxRecords > 0 {
				os.Exit(1)
			}
			return
		}
		fetches.EachError(func(t string, p int32, err error) {
			fmt.Fprintf(os.Stderr, "kafka: %s/%d: %v\n", t, p, err)
		})
		fetches.EachRecord(func(r *kgo.Record) {
			s, err := dec.decode(r.Value)
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s/%d@%d: %v\n", r.Topic, r.Partition, r.Offset, err)
				return
			}
			_ = out.Encode(map[string]any{
				"facility_id": s.FacilityID, "region_id": s.RegionID, "status": s.Status,
				"open_sessions": s.OpenSessions, "since": s.Since.UnixMilli(), "seq": s.Seq,
				"emitted_at": s.EmittedAt.UnixMilli(),
			})
			printed++
		})
	}
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}
